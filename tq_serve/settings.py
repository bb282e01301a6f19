"""Settings of `python -m tq_serve`, resolved once at the edge and passed down frozen.

Sources, highest priority first: command-line flags, `TQ_*` environment variables, a YAML preset
(`--preset NAME` = configs/presets/NAME.yaml, or `--config FILE`; keys are the field names), defaults.
`resolve` then checks them against the model (registry, bit schedule, packed layout) into a `ServeConfig`, whose
`kv_cache` (a TurboQuantConfig, tq_serve/kv_config.py) is what every SGLang process receives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, PlainValidator, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tq_serve.kernels.layout import RAW_BITS, KVLayout
from tq_serve.kv_config import TurboQuantConfig, uniform_bits
from tq_serve.registry import REPO_ROOT, ModelRegistry, ResolvedModel
from tq_serve.schedule import BitSchedule

logger = logging.getLogger(__name__)

PRESETS_DIR = REPO_ROOT / "configs" / "presets"
# Without a cap SGLang sizes the KV pool from free host memory on a CPU: gigabytes, and a minute to allocate.
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


def _kv_bits(value: object) -> float:
    """--kv-bits: the TurboQuant bits, or 16, the alias of --kv-cache bf16 (see `resolve`)."""
    try:
        return uniform_bits(value)
    except ValueError:
        if value in (RAW_BITS, str(RAW_BITS)):
            return RAW_BITS
        raise ValueError(
            f"unsupported bits {value!r}: supported values are 2, 2.5, 3, 3.5, 4 (16: plain SGLang, as --kv-cache bf16)"
        ) from None


class ServeSettings(BaseSettings):
    """OpenAI-compatible SGLang server, TurboQuant KV cache. Each flag is also TQ_<FLAG> and a --preset YAML key."""

    model_config = SettingsConfigDict(
        env_prefix="TQ_",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        cli_prog_name="python -m tq_serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
    )

    preset: str | None = None
    """Name of a YAML preset in configs/presets/ (e.g. cpu-dev, bf16); flags and TQ_* variables override it."""
    config: Path | None = None
    """A YAML settings file with the same keys as a preset (used instead of --preset)."""
    model: str = "tq-tiny"
    """Model alias from configs/models.yaml (tq-tiny, llama-3.1-8b), or a Hugging Face model directory."""
    model_path: Path | None = None
    """Local directory holding the model's weights; default: the alias's path or the Hugging Face cache."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set --api-key then)."""
    port: int = Field(30000, ge=1, le=65535)
    """TCP port of the HTTP server."""
    api_key: str | None = None
    """Require this key as `Authorization: Bearer KEY` on every request."""
    kv_cache: Literal["turboquant", "bf16"] = "turboquant"
    """turboquant: the packed TurboQuant KV cache, set by the --kv-* options below; bf16: plain SGLang with its own
    bf16 KV cache and attention backend, the baseline (the --kv-* options do not apply)."""
    kv_bits: Annotated[float, PlainValidator(_kv_bits)] = 4
    """Bits per K/V coordinate in every layer: 2, 2.5, 3, 3.5 or 4 (prod: 2, 3 or 4). 16 is an alias of --kv-cache bf16
    (plain SGLang); uncompressed 16-bit layers inside the TurboQuant cache are given by a --kv-schedule."""
    kv_schedule: Path | None = None
    """Bit schedule: a YAML file or a name in configs/schedules/, one (k_bits, v_bits) pair per layer (16: a raw
    bf16 layer); replaces --kv-bits (and --kv-variant, when the schedule names its variant)."""
    kv_variant: Literal["mse", "prod"] = "mse"
    """TurboQuant variant: mse (Lloyd-Max codes) or prod (one bit of QJL residual signs; unbiased dot products)."""
    kv_rotation: Literal["qr", "hadamard"] = "qr"
    """Random rotation before quantizing: qr (Haar-random) or hadamard (randomized Walsh-Hadamard; qr is used where
    head_dim is not a power of two)."""
    kv_norm_correction: bool = False
    """Store n / ||c[idx]|| instead of the norm n, so that a reconstructed vector keeps its norm (mse only)."""
    kv_norm_dtype: Literal["float16", "float32"] = "float16"
    """Dtype of the stored norms: float16 (2 bytes) or float32 (4 bytes per norm, so fewer tokens fit)."""
    seed: int = Field(0, ge=0)
    """Seed of the random rotations (and of the QJL matrix for prod)."""
    batch_invariant_cpu: bool = False
    """CPU: turn oneDNN off in SGLang's processes, so that a request's greedy tokens do not depend on its batch or on
    its radix-cache hits (the model's bf16 linears then round each row alike; slower)."""
    triton_interpreter: bool = False
    """CPU: run the Triton kernels under the Triton interpreter instead of the torch path (the GPU code path, slowly;
    for checking it without a GPU)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to run; auto picks cuda when a GPU is visible, else cpu (SGLang's CPU engine, set up automatically)."""
    max_total_tokens: int | None = Field(None, ge=16)
    """Cap on the KV-cache tokens; default: SGLang's memory-based capacity (on a CPU, 65536)."""
    mem_fraction_static: float | None = Field(None, gt=0.0, lt=1.0)
    """Fraction of device memory for weights and KV cache; default: SGLang's choice."""
    max_running_requests: int | None = Field(None, ge=1)
    """Most requests decoded together; default: SGLang's choice."""
    context_length: int | None = Field(None, ge=16)
    """Longest prompt + output in tokens; default: the model's config. Above it, SGLang's override is set
    (SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1) and a warning says the model was not trained there."""
    tp_size: int = Field(1, ge=1)
    """Tensor-parallel size: GPUs one engine spreads over (each holds its share of the KV heads)."""
    chunked_prefill_size: int | None = Field(None, ge=-1)
    """Prompt tokens prefilled per step (-1: no chunking); default: SGLang's choice."""
    served_model_name: str | None = None
    """The model name the OpenAI API reports and accepts; default: the --model alias or directory."""
    sglang_arg: list[str] = []
    """Any other SGLang server argument, passed through: repeat it, one argument each with `=`
    (`--sglang-arg=--schedule-policy=lpm`), or put them after `--`. Checked against SGLang's own parser first."""
    kv_boundary_layers: int = Field(0, ge=0)
    """Keep the first and the last N layers' K/V raw (16-bit) inside the TurboQuant cache, the others at --kv-bits."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server."""
    enable_metrics: bool = False
    """Serve Prometheus metrics at /metrics: SGLang's own (sglang:*) and TurboQuant's (tq_kv_*: bits per layer, bytes
    per token, pool capacity and its bf16 equivalent, slots in use)."""
    dry_run: bool = False
    """Resolve and check everything, print the configuration, and exit without starting the server."""

    # Multi-replica deployment on Ray Serve (tq_serve.deploy): one endpoint, N engines with these same settings.
    replicas: int = Field(1, ge=1)
    """Engine replicas behind the one endpoint; more than 1 deploys on Ray Serve (one GPU each on CUDA)."""
    min_replicas: int | None = Field(None, ge=1)
    """Autoscaling lower bound; default --replicas."""
    max_replicas: int | None = Field(None, ge=1)
    """Autoscaling upper bound; default --replicas (a fixed count). Above 1, deploys on Ray Serve."""
    target_ongoing_requests: float = Field(8, gt=0)
    """In-flight requests per replica that autoscaling aims at; also how far a prompt prefix's home replica may run
    ahead of the least loaded one before its requests are balanced instead."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests one replica takes at once; more wait in Ray Serve's queue."""
    affinity_prefix_chars: int = Field(256, ge=0)
    """Prompts that agree on this many leading characters go to the same replica (radix-cache hits); 0: no affinity."""
    ray_address: str | None = None
    """Ray cluster to deploy on (`ray start --head` prints it; `auto` finds a local one), even with one replica;
    default (or `local`): a private local Ray started and stopped with the server."""

    @field_validator("min_replicas", "max_replicas")
    @classmethod
    def _bounds_include_replicas(cls, value: int | None, info: ValidationInfo) -> int | None:
        replicas = info.data.get("replicas")
        if value is None or replicas is None:
            return value
        if info.field_name == "min_replicas" and value > replicas:
            raise ValueError(f"must be at most --replicas ({replicas})")
        if info.field_name == "max_replicas" and value < replicas:
            raise ValueError(f"must be at least --replicas ({replicas})")
        return value

    @property
    def deploys_on_ray(self) -> bool:
        return self.ray_address is not None or max(self.replicas, self.max_replicas or 1) > 1

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # The CLI source goes in front of these; init kwargs carry the YAML preset, so they rank below TQ_* vars.
        return env_settings, init_settings

    @field_validator("chunked_prefill_size")
    @classmethod
    def _chunk(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (no chunking) or a positive number of tokens")
        return value


def load_settings(argv: list[str]) -> ServeSettings:
    """Parse flags and TQ_* variables; when they name a preset or config file, parse again on top of its values.

    Everything after a bare `--` is SGLang server arguments, appended to --sglang-arg."""
    argv, passthrough = _split_passthrough(argv)
    first = ServeSettings(_cli_parse_args=argv)
    settings = first
    if first.preset is not None or first.config is not None:
        settings = ServeSettings(_cli_parse_args=argv, **_preset_values(first.preset, first.config))
    if passthrough:
        settings = settings.model_copy(update={"sglang_arg": [*settings.sglang_arg, *passthrough]})
    return settings


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return list(argv), []
    cut = argv.index("--")
    return list(argv[:cut]), list(argv[cut + 1 :])


def _preset_values(preset: str | None, config: Path | None) -> dict:
    if config is None:
        config = PRESETS_DIR / f"{preset}.yaml"
        if not config.is_file():
            known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
            raise ValueError(f"unknown preset {preset!r}: known presets are {known}")
    if not config.is_file():
        raise ValueError(f"config file {config} does not exist")
    values = yaml.safe_load(config.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {config}: expected a mapping of settings, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items() if key not in ("preset", "config")}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything the server needs, checked against the model. Built once by `resolve`, never mutated."""

    model: ResolvedModel
    device: Literal["cuda", "cpu"]
    host: str
    port: int
    api_key: str | None
    kv_cache: TurboQuantConfig | None
    """The TurboQuant KV cache, as every SGLang process receives it; None runs plain SGLang with a bf16 KV cache."""
    kv_layout: KVLayout | None
    """kv_cache's packed layout for the whole model (what capacity is computed from); None with kv_cache."""
    max_total_tokens: int | None
    mem_fraction_static: float | None
    max_running_requests: int | None
    log_level: str
    enable_metrics: bool = False
    served_model_name: str = ""
    """What the OpenAI API calls the model (the alias or directory unless --served-model-name)."""
    context_length: int | None = None
    context_override: bool = False
    """context_length exceeds the model's config: SGLang's override is set and a warning printed."""
    tp_size: int = 1
    chunked_prefill_size: int | None = None
    sglang_args: tuple[str, ...] = ()
    """Other SGLang server arguments, as given; checked and parsed by tq_serve.sglang_args."""

    def __post_init__(self) -> None:
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model.name)

    def summary(self) -> dict:
        kv = {"kv_cache": "bf16"}
        if self.kv_cache is not None:
            spec, layout = self.kv_cache, self.kv_layout
            kv = {
                "kv_cache": "turboquant",
                "schedule": None if spec.schedule is None else spec.schedule.name,
                "variant": spec.variant,
                "layer_bits": [list(pair) for pair in layout.layer_bits],
                "rotation": spec.rotation,
                "norm_correction": spec.norm_correction,
                "norm_dtype": spec.norm_dtype,
                "seed": spec.seed,
                "batch_invariant_cpu": spec.batch_invariant_cpu,
                "triton_interpreter": spec.use_triton_interpreter,
                "bytes_per_token": layout.bytes_per_token,
                "bf16_bytes_per_token": layout.bf16_bytes_per_token,
            }
        extra = {
            k: v
            for k, v in {
                "served_model_name": self.served_model_name if self.served_model_name != self.model.name else None,
                "context_length": self.context_length,
                "tp_size": self.tp_size if self.tp_size != 1 else None,
                "chunked_prefill_size": self.chunked_prefill_size,
                "sglang_args": list(self.sglang_args) or None,
            }.items()
            if v is not None
        }
        return (
            {"model": self.model.name, "model_path": str(self.model.path), "device": self.device}
            | kv
            | {
                "url": f"http://{self.host}:{self.port}/v1",
                "max_total_tokens": self.max_total_tokens,
            }
            | extra
        )


def kv_cache_config(settings: ServeSettings, num_layers: int) -> TurboQuantConfig | None:
    """The TurboQuant config the settings ask for (None: plain SGLang), its schedule checked against num_layers."""
    baseline = settings.kv_cache == "bf16" or settings.kv_bits == RAW_BITS
    if settings.kv_cache != "bf16" and settings.kv_bits == RAW_BITS:
        logger.warning(
            "--kv-bits 16 is an alias of --kv-cache bf16: plain SGLang with its own bf16 KV cache and attention "
            "backend, no TurboQuant (16-bit layers inside a TurboQuant cache come from a --kv-schedule)"
        )
    if baseline:
        if settings.kv_schedule is not None:
            raise ValueError(
                "--kv-schedule configures the TurboQuant cache, but --kv-cache bf16 (or --kv-bits 16) asks for "
                "plain SGLang: drop one of them"
            )
        return None
    schedule = None
    if settings.kv_schedule is not None:
        if settings.kv_boundary_layers:
            raise ValueError(
                "--kv-boundary-layers builds a schedule from --kv-bits, and --kv-schedule gives one: drop one of them"
            )
        schedule = BitSchedule.load(settings.kv_schedule, num_layers=num_layers, variant=settings.kv_variant)
    elif settings.kv_boundary_layers:
        schedule = boundary_schedule(num_layers, settings.kv_bits, settings.kv_boundary_layers, settings.kv_variant)
    return TurboQuantConfig(
        kv_bits=None if schedule else settings.kv_bits,
        schedule=schedule,
        variant=None if schedule else settings.kv_variant,
        rotation=settings.kv_rotation,
        norm_correction=settings.kv_norm_correction,
        norm_dtype=settings.kv_norm_dtype,
        seed=settings.seed,
        batch_invariant_cpu=settings.batch_invariant_cpu,
        use_triton_interpreter=settings.triton_interpreter,
    )


def boundary_schedule(num_layers: int, bits: float, boundary: int, variant: str = "mse") -> BitSchedule:
    """The first and last `boundary` layers raw (16-bit K and V), every other layer at `bits`."""
    if 2 * boundary >= num_layers:
        raise ValueError(
            f"--kv-boundary-layers {boundary} keeps {min(2 * boundary, num_layers)} of the model's {num_layers} layers "
            f"raw, leaving none at --kv-bits: use at most {(num_layers - 1) // 2}, or --kv-cache bf16"
        )
    return BitSchedule.first_last(
        num_layers,
        bits,
        edge_bits=RAW_BITS,
        first=boundary,
        last=boundary,
        variant=variant,
        name=f"boundary{boundary}-{bits:g}",
    )


def resolve(settings: ServeSettings, registry: ModelRegistry | None = None) -> ServeConfig:
    """Check the settings against the model; a ValueError names what does not fit and the supported values."""
    from tq_serve.model_support import refusal, unsupported_model_reason

    model = (registry or ModelRegistry.load()).resolve(settings.model, settings.model_path)
    shape = model.shape
    turboquant = settings.kv_cache != "bf16" and settings.kv_bits != RAW_BITS
    reason = unsupported_model_reason(model.config) if turboquant else None
    if reason is not None:
        raise ValueError(refusal(reason))
    kv_cache = kv_cache_config(settings, shape.num_layers)
    layout = None
    if kv_cache is not None:
        try:
            layout = kv_cache.kv_layout(
                num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim
            )
        except ValueError as err:
            source = f"bit schedule {settings.kv_schedule}" if settings.kv_schedule else f"--kv-bits {settings.kv_bits}"
            raise ValueError(
                f"{source} does not fit model {model.name} "
                f"({shape.num_layers} layers, head_dim {shape.head_dim}): {err}"
            ) from None
    device = settings.device
    if device == "auto":
        from tq_serve.cpu_support import detect_device

        device = detect_device()
    if kv_cache is not None and kv_cache.use_triton_interpreter and device != "cpu":
        raise ValueError("--triton-interpreter runs the Triton kernels on a CPU: use it with --device cpu")
    max_total_tokens = settings.max_total_tokens
    if max_total_tokens is None and device == "cpu" and settings.mem_fraction_static is None:
        max_total_tokens = CPU_DEFAULT_MAX_TOTAL_TOKENS
    return ServeConfig(
        model=model,
        device=device,
        host=settings.host,
        port=settings.port,
        api_key=settings.api_key,
        kv_cache=kv_cache,
        kv_layout=layout,
        max_total_tokens=max_total_tokens,
        mem_fraction_static=settings.mem_fraction_static,
        max_running_requests=settings.max_running_requests,
        log_level=settings.log_level,
        enable_metrics=settings.enable_metrics,
        served_model_name=settings.served_model_name or model.name,
        context_length=settings.context_length,
        context_override=settings.context_length is not None and settings.context_length > model.context_length,
        tp_size=settings.tp_size,
        chunked_prefill_size=settings.chunked_prefill_size,
        sglang_args=tuple(settings.sglang_arg),
    )
