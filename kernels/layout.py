"""The packed layout of one K or V vector, and of one token slot of a whole model's KV cache.

One vector (one token, one KV head, one layer) of head_dim d at b bits is stored as a *code row* and its *norms*,
in two separate arrays of the pool (tq_serve.kernels.packed.PackedVectors):

    code row (uint8, code_bytes):   [ code planes of segment 0 | code planes of segment 1 | QJL signs (prod) ]
    norms (norm_dtype, norms_per_vector):   [ n | gamma, the residual norm (prod) ]

Keeping the norms apart lets code rows sit back to back at their natural alignment: at d=128 a 4-bit row is 64 B,
3-bit 48 B, 2-bit 32 B, so every row starts on a 16-byte boundary and a kernel reads it with wide loads. Interleaving
a 2-byte norm into each record (66 B) made every other row misaligned and forced byte loads.

- A *segment* is a run of rotated coordinates quantized with one codebook. Integer bits use one segment over all d
  coordinates; fractional bits (2.5, 3.5) split the rotated vector in two halves at ceil/floor bits (the channel
  split of TurboQuant section 4.3; see `segments`).
- A segment's b-bit codes are stored as *planes* of 4, 2 or 1 bits (4 = one nibble plane, 3 = a 2-bit plane plus a
  1-bit plane, 2 = one crumb plane, 1 = one bit plane). A p-bit plane over n channels is n*p/8 bytes; byte j holds
  channels j, j + n*p/8, j + 2*n*p/8, ... at bit offsets 0, p, 2p, ... So unpacking is shifts and masks only, and each
  shift yields a contiguous block of channels (kernels load whole blocks, never interleave).
- Norms are `norm_dtype` (float16 by default: enough for K/V norms and 2^-11 relative error, far below the
  quantization error). No per-block scale or zero point exists.
- bits = 16 stores the raw bfloat16 vector as its code row (2*d bytes) and no norm: an uncompressed layer in a mixed
  schedule.

At d=128 with float16 norms: 64 + 2 B (4 bits), 48 + 2 (3), 32 + 2 (2), against 256 B in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SUPPORTED_BITS = (1, 2, 2.5, 3, 3.5, 4, 16)
VARIANTS = ("mse", "prod")
NORM_DTYPES = {"float16": 2, "float32": 4}
RAW_BITS = 16

# Integer bits -> plane widths, most significant last: code = plane0 | plane1 << width(plane0).
_PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


def _check_choice(name: str, value: object, supported: tuple | dict) -> None:
    if value not in supported:
        choices = ", ".join(str(s) for s in supported)
        raise ValueError(f"unsupported {name} {value!r}: supported values are {choices}")


@dataclass(frozen=True, kw_only=True)
class Plane:
    """p-bit codes of `channels` coordinates starting at rotated coordinate `start`, `nbytes` bytes at `offset`."""

    offset: int
    bits: int
    shift: int  # bit position of this plane inside the segment's code value
    start: int
    channels: int

    @property
    def nbytes(self) -> int:
        return self.channels * self.bits // 8

    @property
    def per_byte(self) -> int:
        return 8 // self.bits


@dataclass(frozen=True, kw_only=True)
class Segment:
    """Rotated coordinates [start, start + channels) quantized with the `bits`-bit codebook."""

    start: int
    channels: int
    bits: int
    planes: tuple[Plane, ...]


@dataclass(frozen=True, kw_only=True)
class VectorLayout:
    """Byte layout of one packed vector. Frozen: the pool, the kernels, capacity and docs all read this one object."""

    head_dim: int
    bits: float
    variant: str = "mse"
    norm_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_choice("head_dim", self.head_dim, SUPPORTED_HEAD_DIMS)
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("norm_dtype", self.norm_dtype, NORM_DTYPES)
        if self.variant == "prod" and self.bits not in (1, 2, 3, 4, RAW_BITS):
            raise ValueError(f"unsupported bits {self.bits!r} for variant 'prod': supported values are 1, 2, 3, 4, 16")

    @property
    def is_raw(self) -> bool:
        return self.bits == RAW_BITS

    @property
    def mse_bits(self) -> float:
        """Bits of the Lloyd-Max codes: all of them for mse, one fewer for prod (the last bit is the QJL sign)."""
        return self.bits - 1 if self.variant == "prod" else self.bits

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        if self.is_raw or self.mse_bits == 0:
            return ()
        d = self.head_dim
        if self.mse_bits == int(self.mse_bits):
            parts = [(0, d, int(self.mse_bits))]
        else:
            # Fractional bits: half the rotated coordinates at ceil(b), half at floor(b), averaging exactly b.
            # After the rotation all coordinates are identically distributed, so which half gets more bits is
            # immaterial and one rotation serves both halves.
            hi, lo = math.ceil(self.mse_bits), math.floor(self.mse_bits)
            parts = [(0, d // 2, hi), (d // 2, d // 2, lo)]
        segments, offset = [], 0
        for start, channels, bits in parts:
            planes, shift = [], 0
            for width in _PLANES[bits]:
                plane = Plane(offset=offset, bits=width, shift=shift, start=start, channels=channels)
                planes.append(plane)
                offset += plane.nbytes
                shift += width
            segments.append(Segment(start=start, channels=channels, bits=bits, planes=tuple(planes)))
        return tuple(segments)

    @property
    def plane_bytes(self) -> int:
        """Bytes of the Lloyd-Max code planes of all segments (the code row before the QJL signs)."""
        return sum(p.nbytes for s in self.segments for p in s.planes)

    @property
    def qjl_offset(self) -> int:
        return self.plane_bytes

    @property
    def qjl_bytes(self) -> int:
        return self.head_dim // 8 if self.variant == "prod" and not self.is_raw else 0

    @property
    def code_bytes(self) -> int:
        """Bytes of one code row: the code planes and QJL signs, or the bfloat16 vector of a raw layout."""
        return 2 * self.head_dim if self.is_raw else self.plane_bytes + self.qjl_bytes

    @property
    def code_row_align(self) -> int:
        """The alignment in bytes of every code row of a pool (rows are back to back): the largest power of two up to
        16 that divides code_bytes. 16 at d=128 for 2, 3 and 4 bits."""
        return math.gcd(self.code_bytes, 16)

    @property
    def norms_per_vector(self) -> int:
        """Norms stored beside the code row: none (raw), n (mse), n and the residual norm gamma (prod)."""
        if self.is_raw:
            return 0
        return 2 if self.variant == "prod" else 1

    @property
    def norm_bytes(self) -> int:
        """Bytes of one stored norm."""
        return NORM_DTYPES[self.norm_dtype]

    @property
    def bytes_per_vector(self) -> int:
        return self.code_bytes + self.norms_per_vector * self.norm_bytes


def parse_bits(value: object) -> float:
    """A bits value from user input (CLI, YAML): 4, '4', 3.5, '2.5' -> a member of SUPPORTED_BITS."""
    try:
        bits = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        bits = math.nan
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits {value!r}: supported values are {', '.join(map(str, SUPPORTED_BITS))}")
    return int(bits) if bits == int(bits) else bits


@dataclass(frozen=True, kw_only=True)
class KVLayout:
    """Bytes of one token slot across a model's KV cache, with per-layer (k_bits, v_bits)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_bits: tuple[tuple[float, float], ...]
    variant: str = "mse"
    norm_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_kv_heads < 1:
            raise ValueError(f"num_layers and num_kv_heads must be >= 1, got {self.num_layers}, {self.num_kv_heads}")
        if len(self.layer_bits) != self.num_layers:
            raise ValueError(
                f"layer_bits has {len(self.layer_bits)} entries but the model has {self.num_layers} layers: "
                "give one (k_bits, v_bits) pair per layer"
            )
        for layer, pair in enumerate(self.layer_bits):
            if len(pair) != 2:
                raise ValueError(f"layer {layer}: expected a (k_bits, v_bits) pair, got {pair!r}")
            for kind, bits in zip("kv", pair, strict=True):
                try:
                    self._vector(bits)
                except ValueError as err:
                    raise ValueError(f"layer {layer} {kind}_bits: {err}") from None

    @classmethod
    def uniform(
        cls, *, num_layers: int, num_kv_heads: int, head_dim: int, bits: float, variant: str = "mse", **kw
    ) -> KVLayout:
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            layer_bits=((bits, bits),) * num_layers,
            variant=variant,
            **kw,
        )

    def _vector(self, bits: float) -> VectorLayout:
        return VectorLayout(head_dim=self.head_dim, bits=bits, variant=self.variant, norm_dtype=self.norm_dtype)

    def k(self, layer: int) -> VectorLayout:
        return self._vector(self.layer_bits[layer][0])

    def v(self, layer: int) -> VectorLayout:
        return self._vector(self.layer_bits[layer][1])

    @property
    def bytes_per_token(self) -> int:
        """Exact bytes the pool allocates per token slot: K and V, every layer, every KV head."""
        per_head = sum(self.k(i).bytes_per_vector + self.v(i).bytes_per_vector for i in range(self.num_layers))
        return per_head * self.num_kv_heads

    @property
    def bf16_bytes_per_token(self) -> int:
        return self.num_layers * self.num_kv_heads * 2 * self.head_dim * 2

    @property
    def compression_ratio(self) -> float:
        """How many more tokens than bf16 the same memory holds."""
        return self.bf16_bytes_per_token / self.bytes_per_token

    @property
    def average_bits(self) -> float:
        return sum(k + v for k, v in self.layer_bits) / (2 * self.num_layers)
