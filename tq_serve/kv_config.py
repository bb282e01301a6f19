"""The TurboQuant KV-cache specification: one frozen object from the command line to every SGLang process.

    python -m tq_serve --kv-bits 3 ...   settings.resolve, at the edge: flags, TQ_* variables and presets, every bits
                                         value through kernels.layout.parse_bits, a schedule through BitSchedule.load
      -> TurboQuantConfig                built there once, checked against the model, never mutated
      -> TQ_SGLANG_CONFIG='{...}'        server.sglang_environment: the object serialised, in one variable that
                                         SGLang's scheduler processes inherit
      -> TurboQuantConfig.from_env()     the plug-in's register() in every SGLang process: deserialised, not resolved
      -> KVLayout of the process's layers  hooks.kv_layout_of: this pipeline stage's layers, its KV heads

The plain-SGLang baseline (`--kv-cache bf16`) has no TurboQuantConfig: the variable is then absent.
Imports no SGLang and no pydantic, so kernels-level tools and tests can build one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from tq_serve.kernels.layout import NORM_DTYPES, VARIANTS, KVLayout, parse_bits
from tq_serve.schedule import BitSchedule, LayerBits

ENV_VAR = "TQ_SGLANG_CONFIG"
UNIFORM_BITS = (2, 2.5, 3, 3.5, 4)
"""Bits of a cache without a schedule. Raw 16-bit layers exist only inside a schedule (configs/schedules/): a
uniform 16 is the plain-SGLang baseline, which is not a TurboQuant cache at all."""


def _choice(name: str, value: object, supported: tuple | Mapping) -> None:
    if value not in supported:
        raise ValueError(f"unsupported {name} {value!r}: supported values are {', '.join(map(str, supported))}")


def uniform_bits(value: object) -> float:
    """A --kv-bits value (4, '3.5', ...) -> a member of UNIFORM_BITS, through the one bits parser."""
    try:
        bits = parse_bits(value)
    except ValueError:
        bits = None
    if isinstance(value, bool) or bits not in UNIFORM_BITS:
        raise ValueError(f"unsupported bits {value!r}: supported values are {', '.join(map(str, UNIFORM_BITS))}")
    return bits


@dataclass(frozen=True, kw_only=True)
class TurboQuantConfig:
    """How the plug-in packs the KV cache: uniform `kv_bits` or a per-layer `schedule`, and how vectors are coded."""

    kv_bits: float | None = 4
    """Bits per coordinate of K and V in every layer (2, 2.5, 3, 3.5, 4); None when a schedule gives them."""
    schedule: BitSchedule | None = None
    """Per-layer (k_bits, v_bits) and the variant; replaces kv_bits (set to None) and fixes `variant`."""
    variant: str | None = None
    """"mse" (b-bit Lloyd-Max codes) or "prod" (b-1 bit codes + 1-bit QJL of the residual). None: the schedule's
    variant, or mse without one; a variant that contradicts the schedule's is refused."""
    rotation: str = "qr"
    """"qr" (Haar-random orthogonal) or "hadamard" (randomized Walsh-Hadamard; qr where head_dim is no power of 2)."""
    norm_correction: bool = False
    """Store n / ||c[idx]|| instead of n, so that a reconstruction keeps the vector's norm (mse only)."""
    norm_dtype: str = "float16"
    """The dtype the norms are stored in: float16 (2 B, 2^-11 relative error) or float32."""
    seed: int = 0
    """Seed of the rotation (and of the QJL matrix for prod); the same for every layer, K and V."""
    batch_invariant_cpu: bool = False
    """Turn oneDNN off in each process, so that the model's own bf16 matmuls on a CPU round a token's row the same
    however many rows share the matmul (with oneDNN they do not below a few dozen rows). The TurboQuant attention is
    row-invariant either way; with this the whole model is, so a request's greedy tokens do not depend on its batch
    or on how much of its prompt hit the radix cache (tests/test_prefix_invariance.py). Slower linears."""
    use_triton_interpreter: bool = False
    """Run the Triton kernels under TRITON_INTERPRET=1 on a CPU (the GPU code path, slowly) instead of torch."""

    def __post_init__(self) -> None:
        if self.schedule is not None:
            if self.variant not in (None, self.schedule.variant):
                raise ValueError(
                    f"variant {self.variant!r} contradicts bit schedule {self.schedule.name!r}, which is "
                    f"{self.schedule.variant!r}"
                )
            object.__setattr__(self, "kv_bits", None)
            object.__setattr__(self, "variant", self.schedule.variant)
        elif self.kv_bits is None:
            raise ValueError("TurboQuantConfig needs kv_bits or a schedule")
        else:
            object.__setattr__(self, "kv_bits", uniform_bits(self.kv_bits))
        if self.variant is None:
            object.__setattr__(self, "variant", "mse")
        _choice("variant", self.variant, VARIANTS)
        from tq_serve.kernels.rotation import ROTATIONS  # imports torch: not at module level, for a fast --help

        _choice("rotation", self.rotation, ROTATIONS)
        _choice("norm_dtype", self.norm_dtype, NORM_DTYPES)
        if self.norm_correction and self.variant != "mse":
            raise ValueError("norm_correction applies to the 'mse' variant only (prod keeps the exact norm)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def layer_bits(self) -> LayerBits | None:
        """The schedule's (k_bits, v_bits) per layer; None for uniform kv_bits."""
        return None if self.schedule is None else self.schedule.layer_bits

    def model_layer_bits(self, num_layers: int) -> LayerBits:
        """(k_bits, v_bits) of each of a model's num_layers layers; a ValueError when the schedule has another count."""
        if self.schedule is None:
            return ((self.kv_bits, self.kv_bits),) * num_layers
        return self.schedule.check_layers(num_layers).layer_bits

    def kv_layout(
        self, *, num_layers: int, num_kv_heads: int, head_dim: int, start_layer: int = 0, end_layer: int | None = None
    ) -> KVLayout:
        """The packed layout of layers [start_layer, end_layer) of a model with num_layers layers.

        A bit schedule is indexed by the model's layer id; a pipeline stage holds only its own slice of it.
        """
        end_layer = num_layers if end_layer is None else end_layer
        return KVLayout(
            num_layers=end_layer - start_layer,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_bits=self.model_layer_bits(num_layers)[start_layer:end_layer],
            variant=self.variant,
            norm_dtype=self.norm_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, the schedule as its YAML mapping (BitSchedule.to_dict)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.schedule is not None:
            data["schedule"] = self.schedule.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> TurboQuantConfig:
        """The inverse of to_json; every field is checked again, as on construction (errors name ENV_VAR)."""
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
        if data.get("schedule") is not None:
            data["schedule"] = BitSchedule.from_dict(data["schedule"], source=f"{ENV_VAR} schedule")
        return cls(**data)

    def to_env(self) -> dict[str, str]:
        """The environment entry the launcher sets before SGLang starts: `os.environ.update(config.to_env())`."""
        return {ENV_VAR: self.to_json()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TurboQuantConfig:
        """The config the launcher set, or the defaults (uniform 4-bit mse) when the variable is absent: an SGLang
        started by hand with `--attention-backend turboquant`."""
        environ = os.environ if environ is None else environ
        text = environ.get(ENV_VAR)
        return cls() if not text else cls.from_json(text)
