"""Model registry: an alias from configs/models.yaml -> a local model directory and the shape facts tq_serve checks
bit settings against. Nothing is downloaded: a `hf_id` is found in --model-path or in the Hugging Face cache."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_YAML = REPO_ROOT / "configs" / "models.yaml"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
CONTEXT_LENGTH_KEYS = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
)


class ModelNotFoundError(ValueError):
    """An unknown alias, or a known one whose weights are not on this machine."""


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One alias of configs/models.yaml: a repo-relative `path` or a Hugging Face `hf_id`."""

    alias: str
    description: str = ""
    path: Path | None = None
    hf_id: str | None = None
    obtain: str = ""
    shape: ModelShape | None = None
    """The KV-cache shape as recorded in the YAML, for estimates on a machine without the weights."""
    architecture: str | None = None
    """The Hugging Face architecture class (config.json `architectures`), e.g. Gemma2ForCausalLM."""
    tiny: str | None = None
    """The tiny random-weight stand-in (tq_serve.models.tiny_arch) that the tests serve for this architecture."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What the KV cache of a model looks like: the facts a bit setting must fit."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a Hugging Face config.json (head_dim defaults to hidden_size / num_attention_heads, as in Llama; a
        multimodal config's language model is its `text_config`)."""
        config = text_config(config)
        heads = config["num_attention_heads"]
        return cls(
            num_layers=config["num_hidden_layers"],
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )


@dataclass(frozen=True, kw_only=True)
class ResolvedModel:
    """A model found on this machine."""

    name: str
    path: Path
    shape: ModelShape
    config: dict = field(default_factory=dict, compare=False, repr=False)
    """The model's config.json."""

    @property
    def context_length(self) -> int:
        """The context the model's config declares, read as SGLang 0.5.23 reads it (get_context_length): the first
        of CONTEXT_LENGTH_KEYS present, times a RoPE scaling factor unless the scaling names its original length."""
        config = text_config(self.config)
        scaling = config.get("rope_scaling") or {}
        factor = scaling.get("factor", 1)
        if "original_max_position_embeddings" in scaling or scaling.get("rope_type") == "llama3":
            factor = 1
        for key in CONTEXT_LENGTH_KEYS:
            if config.get(key) is not None:
                return int(factor * config[key])
        return 2048


def text_config(config: dict) -> dict:
    """The language model's part of a config.json: `text_config` for multimodal wrappers, else the whole."""
    return config.get("text_config") or config


class ModelRegistry:
    def __init__(self, entries: dict[str, ModelEntry], default: str):
        self.entries = entries
        self.default = default

    @classmethod
    def load(cls, path: Path = MODELS_YAML, root: Path = REPO_ROOT) -> ModelRegistry:
        """Read and check models.yaml: unknown keys, a shape without its three facts, an alias with neither a path
        nor an hf_id, and an unknown tiny stand-in are refused with the alias and key named."""
        data = yaml.safe_load(path.read_text())
        entries = {}
        known = {f.name for f in fields(ModelEntry)} - {"alias"}
        shape_keys = {f.name for f in fields(ModelShape)}
        for alias, spec in data["models"].items():
            where = f"{path.name}: model {alias!r}"
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}: known keys are {sorted(known)}")
            if not spec.get("path") and not spec.get("hf_id"):
                raise ValueError(f"{where}: give a repo-relative `path` or a Hugging Face `hf_id`")
            shape = spec.get("shape")
            if shape is not None and (not isinstance(shape, dict) or set(shape) != shape_keys):
                raise ValueError(f"{where}: shape must give exactly {sorted(shape_keys)}, got {shape!r}")
            if shape is not None and not all(isinstance(v, int) and v > 0 for v in shape.values()):
                raise ValueError(f"{where}: shape values must be positive integers, got {shape!r}")
            tiny = spec.get("tiny")
            if tiny is not None:
                from tq_serve.models.tiny_arch import ARCHS

                if tiny not in ARCHS:
                    raise ValueError(f"{where}: unknown tiny architecture {tiny!r}: known are {', '.join(ARCHS)}")
            local = spec.get("path")
            entries[alias] = ModelEntry(
                alias=alias,
                description=spec.get("description", ""),
                path=root / local if local else None,
                hf_id=spec.get("hf_id"),
                obtain=spec.get("obtain", ""),
                shape=ModelShape(**shape) if shape is not None else None,
                architecture=spec.get("architecture"),
                tiny=tiny,
            )
        return cls(entries, default=data.get("default", next(iter(entries))))

    def known(self) -> str:
        return ", ".join(self.entries)

    def resolve(self, name: str, model_path: Path | None = None) -> ResolvedModel:
        """`name` is an alias or a model directory; `model_path` overrides where an alias's weights are."""
        entry = self.entries.get(name)
        if entry is None and model_path is None and Path(name).is_dir():
            entry, model_path = ModelEntry(alias=name, obtain="give a Hugging Face model directory"), Path(name)
        if entry is None:
            raise ModelNotFoundError(
                f"unknown model {name!r}: known models are {self.known()} (or give a model directory); "
                f"aliases are defined in {MODELS_YAML.relative_to(REPO_ROOT)}"
            )
        where = model_path or entry.path or _hf_cache_dir(entry.hf_id)
        if where is None or not _has_weights(where):
            source = f"in {where}" if where else f"in the Hugging Face cache for {entry.hf_id}"
            raise ModelNotFoundError(
                f"model {name!r}: no config.json and weights found {source}; to obtain them, "
                f"{entry.obtain or 'pass --model-path DIR'}"
            )
        config = json.loads((where / "config.json").read_text())
        return ResolvedModel(name=name, path=where.resolve(), shape=ModelShape.from_config(config), config=config)

    def shape(self, name: str, model_path: Path | None = None) -> ModelShape:
        """The KV-cache shape of a model: from its config.json when it is here, else as recorded in the YAML."""
        entry = self.entries.get(name)
        try:
            return self.resolve(name, model_path).shape
        except ModelNotFoundError:
            if entry is None or entry.shape is None or model_path is not None:
                raise
            return entry.shape


def _hf_cache_dir(hf_id: str | None) -> Path | None:
    """The snapshot directory of `hf_id` in the Hugging Face cache (offline lookup), or None."""
    if hf_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hf_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any(next(path.glob(p), None) for p in WEIGHT_PATTERNS)
