"""The frozen TurboQuant configuration handed from the launcher to the SGLang plug-in.

SGLang starts its scheduler in subprocesses and calls the plug-in's `register()` in each of them, with no way to pass
arguments. So the launcher (python -m tq_serve) writes this config as JSON into ONE environment variable before SGLang
starts, every process inherits it, and `TurboQuantConfig.from_env()` is the only place that reads it:

    TQ_SGLANG_CONFIG='{"kv_bits": 4, "layer_bits": null, "variant": "mse", "norm_dtype": "float16", "seed": 0,
                       "rotation": "qr", "norm_correction": false, "use_triton_interpreter": false,
                       "batch_invariant_cpu": false}'

A missing variable means the defaults: uniform 4-bit mse.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from tq_serve.kernels.layout import NORM_DTYPES, VARIANTS, KVLayout, parse_bits
from tq_serve.kernels.rotation import ROTATIONS

ENV_VAR = "TQ_SGLANG_CONFIG"
BACKEND_NAME = "turboquant"  # the --attention-backend choice the plug-in registers


@dataclass(frozen=True, kw_only=True)
class TurboQuantConfig:
    """How the plug-in packs the KV cache. Frozen: resolved once at the edge, then passed down."""

    kv_bits: float | None = 4
    """Bits per coordinate of K and V in every layer; ignored when layer_bits is given."""
    layer_bits: tuple[tuple[float, float], ...] | None = None
    """Per-layer (k_bits, v_bits), one pair per model layer (a bit schedule); overrides kv_bits."""
    variant: str = "mse"
    """"mse" (b-bit Lloyd-Max codes) or "prod" (b-1 bit codes + 1-bit QJL of the residual)."""
    norm_dtype: str = "float16"
    seed: int = 0
    """Seed of the rotation (and of the QJL matrix for prod); the same for every layer, K and V."""
    rotation: str = "qr"
    norm_correction: bool = False
    use_triton_interpreter: bool = False
    """Run the Triton kernels under TRITON_INTERPRET=1 on a CPU (tests of the GPU code path) instead of torch."""
    batch_invariant_cpu: bool = False
    """Turn oneDNN off in each process, so that the model's own bf16 matmuls on a CPU round a token's row the same
    however many rows share the matmul (with oneDNN they do not below a few dozen rows). The TurboQuant attention is
    row-invariant either way; with this the whole model is, so a request's greedy tokens do not depend on its batch
    or on how much of its prompt hit the radix cache (tests/test_prefix_invariance.py). Slower linears."""

    def __post_init__(self) -> None:
        if self.layer_bits is None and self.kv_bits is None:
            raise ValueError("TurboQuantConfig needs kv_bits or layer_bits")
        if self.kv_bits is not None:
            object.__setattr__(self, "kv_bits", parse_bits(self.kv_bits))
        if self.layer_bits is not None:
            pairs = []
            for layer, pair in enumerate(self.layer_bits):
                if len(pair) != 2:
                    raise ValueError(f"layer_bits[{layer}]: expected a [k_bits, v_bits] pair, got {pair!r}")
                pairs.append((parse_bits(pair[0]), parse_bits(pair[1])))
            if not pairs:
                raise ValueError("layer_bits is empty: give one [k_bits, v_bits] pair per layer, or null")
            object.__setattr__(self, "layer_bits", tuple(pairs))
        if self.variant not in VARIANTS:
            raise ValueError(f"unsupported variant {self.variant!r}: supported values are {', '.join(VARIANTS)}")
        if self.norm_dtype not in NORM_DTYPES:
            raise ValueError(
                f"unsupported norm_dtype {self.norm_dtype!r}: supported values are {', '.join(NORM_DTYPES)}"
            )
        if self.rotation not in ROTATIONS:
            raise ValueError(f"unsupported rotation {self.rotation!r}: supported values are {', '.join(ROTATIONS)}")
        if self.norm_correction and self.variant != "mse":
            raise ValueError("norm_correction applies to the 'mse' variant only (prod keeps the exact norm)")

    def kv_layout(
        self, *, num_layers: int, num_kv_heads: int, head_dim: int, start_layer: int = 0, end_layer: int | None = None
    ) -> KVLayout:
        """The packed layout of this process's layers [start_layer, end_layer) of a model with num_layers layers.

        A bit schedule is indexed by the model's layer id; a pipeline stage holds only its own slice of it.
        """
        end_layer = num_layers if end_layer is None else end_layer
        if self.layer_bits is None:
            schedule = ((self.kv_bits, self.kv_bits),) * num_layers
        elif len(self.layer_bits) != num_layers:
            raise ValueError(
                f"the bit schedule has {len(self.layer_bits)} (k_bits, v_bits) pairs but the model has {num_layers} "
                "layers: give one pair per layer"
            )
        else:
            schedule = self.layer_bits
        return KVLayout(
            num_layers=end_layer - start_layer,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_bits=schedule[start_layer:end_layer],
            variant=self.variant,
            norm_dtype=self.norm_dtype,
        )

    def to_json(self) -> str:
        data = asdict(self)
        if self.layer_bits is not None:
            data["layer_bits"] = [list(pair) for pair in self.layer_bits]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> TurboQuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{ENV_VAR} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{ENV_VAR} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{ENV_VAR} has unknown keys {unknown}: known keys are {sorted(known)}")
        if data.get("layer_bits") is not None:
            data["layer_bits"] = tuple(tuple(pair) for pair in data["layer_bits"])
        return cls(**data)

    def to_env(self) -> dict[str, str]:
        """The environment entry the launcher sets before SGLang starts: `os.environ.update(config.to_env())`."""
        return {ENV_VAR: self.to_json()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TurboQuantConfig:
        """The config the launcher set, or the defaults (uniform 4-bit mse) when the variable is absent."""
        environ = os.environ if environ is None else environ
        text = environ.get(ENV_VAR)
        return cls() if not text else cls.from_json(text)
