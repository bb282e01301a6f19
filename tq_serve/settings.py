"""Settings of `python -m tq_serve`, resolved once at the edge and passed down frozen.

Sources, highest priority first: command-line flags, `TQ_*` environment variables, a YAML preset
(`--preset NAME` = configs/presets/NAME.yaml, or `--config FILE`; keys are the field names), defaults.
`resolve` then checks them against the model (registry, bit schedule, packed layout) into a `ServeConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tq_serve.kernels.layout import KVLayout, parse_bits
from tq_serve.registry import REPO_ROOT, ModelRegistry, ResolvedModel

PRESETS_DIR = REPO_ROOT / "configs" / "presets"
BF16_BITS = 16
# Without a cap SGLang sizes the KV pool from free host memory on a CPU: gigabytes, and a minute to allocate.
CPU_DEFAULT_MAX_TOTAL_TOKENS = 65536


def _number(value: object) -> object:
    """CLI and environment values arrive as strings; Literal[2, 2.5, ...] only matches numbers."""
    if isinstance(value, str):
        number = float(value)
        return int(number) if number.is_integer() else number
    return value


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
    kv_bits: Annotated[Literal[2, 2.5, 3, 3.5, 4, 16], BeforeValidator(_number)] = 4
    """Bits per K/V coordinate for every layer; 16 runs plain SGLang with a bf16 KV cache (the baseline)."""
    kv_schedule: Path | None = None
    """Bit schedule: a YAML file or a name in configs/schedules/, one (k_bits, v_bits) pair per layer; replaces
    --kv-bits (and --kv-variant, when the schedule names its variant)."""
    kv_variant: Literal["mse", "prod"] = "mse"
    """TurboQuant variant: mse (Lloyd-Max codes) or prod (one bit of QJL residual signs; unbiased dot products)."""
    seed: int = Field(0, ge=0)
    """Seed of the random rotations."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to run; auto picks cuda when a GPU is visible, else cpu (SGLang's CPU engine, set up automatically)."""
    max_total_tokens: int | None = Field(None, ge=16)
    """Cap on the KV-cache tokens; default: SGLang's memory-based capacity (on a CPU, 65536)."""
    mem_fraction_static: float | None = Field(None, gt=0.0, lt=1.0)
    """Fraction of device memory for weights and KV cache; default: SGLang's choice."""
    max_running_requests: int | None = Field(None, ge=1)
    """Most requests decoded together; default: SGLang's choice."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the server."""
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


def load_settings(argv: list[str]) -> ServeSettings:
    """Parse flags and TQ_* variables; when they name a preset or config file, parse again on top of its values."""
    first = ServeSettings(_cli_parse_args=argv)
    if first.preset is None and first.config is None:
        return first
    return ServeSettings(_cli_parse_args=argv, **_preset_values(first.preset, first.config))


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


def read_kv_schedule(path_or_name: Path | str) -> tuple[tuple[tuple[float, float], ...], str | None]:
    """Per-layer (k_bits, v_bits) and the variant (None: not given) of a bit schedule.

    `path_or_name` is a YAML file or the name of one in configs/schedules/. The file holds a plain list of
    [k_bits, v_bits] pairs, a mapping whose `layer_bits` is that list, or a full BitSchedule (name, model,
    variant, ...), which is validated as such: errors name the layer and the value."""
    from tq_serve.schedule import BitSchedule, resolve_schedule_path

    path = resolve_schedule_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read bit schedule {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"bit schedule {path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and "name" in data:
        schedule = BitSchedule.from_dict(data, source=f"bit schedule {path}")
        return schedule.layer_bits, schedule.variant
    pairs = data.get("layer_bits") if isinstance(data, dict) else data
    if not isinstance(pairs, list) or not all(isinstance(p, list | tuple) and len(p) == 2 for p in pairs):
        raise ValueError(f"bit schedule {path}: expected a list of [k_bits, v_bits] pairs, one per layer")
    variant = data.get("variant") if isinstance(data, dict) else None
    return tuple((parse_bits(k), parse_bits(v)) for k, v in pairs), variant


def load_kv_schedule(path_or_name: Path | str) -> tuple[tuple[float, float], ...]:
    """Per-layer (k_bits, v_bits) of a bit schedule (see read_kv_schedule)."""
    return read_kv_schedule(path_or_name)[0]


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything the server needs, checked against the model. Built once by `resolve`, never mutated."""

    model: ResolvedModel
    device: Literal["cuda", "cpu"]
    host: str
    port: int
    api_key: str | None
    kv_layout: KVLayout | None
    """The packed TurboQuant layout; None runs plain SGLang with a bf16 KV cache."""
    seed: int
    max_total_tokens: int | None
    mem_fraction_static: float | None
    max_running_requests: int | None
    log_level: str

    def summary(self) -> dict:
        layout = self.kv_layout
        kv = (
            {"kv_cache": "bf16"}
            if layout is None
            else {
                "kv_cache": "turboquant",
                "variant": layout.variant,
                "layer_bits": [list(pair) for pair in layout.layer_bits],
                "bytes_per_token": layout.bytes_per_token,
                "bf16_bytes_per_token": layout.bf16_bytes_per_token,
            }
        )
        return (
            {"model": self.model.name, "model_path": str(self.model.path), "device": self.device}
            | kv
            | {
                "url": f"http://{self.host}:{self.port}/v1",
                "max_total_tokens": self.max_total_tokens,
            }
        )


def resolve(settings: ServeSettings, registry: ModelRegistry | None = None) -> ServeConfig:
    """Check the settings against the model; a ValueError names what does not fit and the supported values."""
    model = (registry or ModelRegistry.load()).resolve(settings.model, settings.model_path)
    shape = model.shape
    layer_bits, variant = read_kv_schedule(settings.kv_schedule) if settings.kv_schedule else (None, None)
    variant = variant or settings.kv_variant  # a schedule that names its variant overrides --kv-variant
    layout = None
    if layer_bits is not None or settings.kv_bits != BF16_BITS:
        layer_bits = layer_bits or ((settings.kv_bits, settings.kv_bits),) * shape.num_layers
        try:
            layout = KVLayout(
                num_layers=shape.num_layers,
                num_kv_heads=shape.num_kv_heads,
                head_dim=shape.head_dim,
                layer_bits=layer_bits,
                variant=variant,
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
    max_total_tokens = settings.max_total_tokens
    if max_total_tokens is None and device == "cpu" and settings.mem_fraction_static is None:
        max_total_tokens = CPU_DEFAULT_MAX_TOTAL_TOKENS
    return ServeConfig(
        model=model,
        device=device,
        host=settings.host,
        port=settings.port,
        api_key=settings.api_key,
        kv_layout=layout,
        seed=settings.seed,
        max_total_tokens=max_total_tokens,
        mem_fraction_static=settings.mem_fraction_static,
        max_running_requests=settings.max_running_requests,
        log_level=settings.log_level,
    )
