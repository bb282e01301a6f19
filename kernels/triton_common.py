"""What the Triton kernels share: how a packed record (layout.py) becomes register tiles, and back.

Tile order. A kernel never rebuilds a vector in channel order. Each segment of a record is read as one tile of
PIECES * UP columns, where a *piece* is the run of channels that one shift of the segment's finest plane yields:

    segment of n channels, finest plane p_min bits:  U = n * p_min / 8 bytes,  PIECES = 8 / p_min
    tile column  piece * UP + j  (j < UP = next power of two >= U)  <->  channel  start + piece * U + j,  valid if j < U

    plane of p bits (nbytes = m * U, m = p * PIECES / 8):  byte  (piece % m) * U + j,  shift  (piece // m) * p

So every plane of a piece is a contiguous run of U bytes (vectorized loads, each byte fetched from DRAM once and
re-read from L1 by the other pieces of its plane), unpacking is a shift and a mask, and a 3-bit code (2-bit plane +
1-bit plane) is assembled column by column without any gather across registers. The query is loaded in the same
column order and the value accumulator lives in it; both map back to channels only at the load/store of that one
vector. Padded columns (j >= U, for head_dim 80/96) load as 0 and are never stored. QJL signs (prod) are a 1-bit
plane over all head_dim channels and use the same order with PIECES = 8. A raw (16-bit) record is a single segment
in channel order whose bytes are the bfloat16 values.

Centroids are looked up with one load from a (32,) float32 codebook buffer (16 entries per segment): the buffer is a
single 128-byte line that stays in L1, it is one instruction per element whatever the bits, where a tl.where chain
costs 2**bits - 1 selects per element (15 at 4 bits) and ALU time is what the unpack competes with. Loads issue at a
quarter of the ALU rate, so if a profile shows the load unit saturated, the next step is a byte -> centroid-pair table
(one load per byte of a 4-bit plane yields two channels).

The constant parameters of one record layout are passed to the kernels as flat constexprs named `<P>_...` with
P = K or V (see RecordTiles.constexprs); kernels and helpers take them in the same order.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from .layout import VectorLayout
from .packed import PackedVectors
from .quantizer import TurboQuantizer

CODEBOOK_STRIDE = 16  # entries reserved per segment in the codebook and boundary buffers (4 bits at most)
MAX_SEGMENTS = 2


@dataclass(frozen=True, kw_only=True)
class SegmentTile:
    """Tile geometry of one segment (see the module docstring). For a raw record: the whole vector as bf16."""

    start: int
    u: int
    up: int
    pieces: int
    bits: int
    a_off: int
    a_bits: int
    b_off: int  # offset of the 1-bit high plane of a 3-bit code, -1 when the segment has one plane


@dataclass(frozen=True, kw_only=True)
class RecordTiles:
    """Every constant a kernel needs to read or write records of one VectorLayout."""

    layout: VectorLayout
    segments: tuple[SegmentTile, ...]

    def constexprs(self, prefix: str) -> dict[str, int]:
        lay = self.layout
        d = lay.head_dim
        out = {
            f"{prefix}_RAW": int(lay.is_raw),
            f"{prefix}_NSEG": len(self.segments),
            f"{prefix}_PROD": int(lay.variant == "prod" and not lay.is_raw),
            f"{prefix}_QJL_OFF": lay.qjl_offset,
            f"{prefix}_U8": d // 8,
            f"{prefix}_UP8": triton.next_power_of_2(d // 8),
        }
        empty = SegmentTile(start=0, u=1, up=1, pieces=16, bits=1, a_off=0, a_bits=1, b_off=-1)
        for i in range(MAX_SEGMENTS):
            seg = self.segments[i] if i < len(self.segments) else empty
            for name in ("start", "u", "up", "pieces", "bits", "a_off", "a_bits", "b_off"):
                out[f"{prefix}_S{i}_{name.upper()}"] = getattr(seg, name)
        return out


def unsupported_reason(layout: VectorLayout) -> str | None:
    """Why the Triton kernels cannot serve `layout` (the torch reference can), or None."""
    if layout.variant == "prod" and not layout.is_raw and layout.mse_bits == 0:
        return "prod at 1 bit (QJL signs only, no Lloyd-Max codes)"
    if len(layout.segments) > MAX_SEGMENTS:
        return f"{len(layout.segments)} segments (the kernels read at most {MAX_SEGMENTS})"
    for seg in layout.segments:
        widths = tuple(p.bits for p in seg.planes)
        if widths not in ((4,), (2,), (1,), (2, 1)):
            return f"plane widths {widths} (the kernels read (4,), (2,), (1,) and (2, 1))"
    return None


@cache
def record_tiles(layout: VectorLayout) -> RecordTiles:
    """The tile geometry of `layout`; raises ValueError for layouts the kernels were not built for."""
    reason = unsupported_reason(layout)
    if reason is not None:
        raise ValueError(
            f"the TurboQuant Triton kernels do not support {layout}: {reason}; use the torch reference "
            "(tq_serve.kernels.reference) for this layer"
        )
    d = layout.head_dim
    if layout.is_raw:
        seg = SegmentTile(start=0, u=d, up=triton.next_power_of_2(d), pieces=1, bits=16, a_off=0, a_bits=16, b_off=-1)
        return RecordTiles(layout=layout, segments=(seg,))
    segments = []
    for seg in layout.segments:
        first, finest = seg.planes[0], seg.planes[-1]
        u = finest.nbytes
        segments.append(
            SegmentTile(
                start=seg.start,
                u=u,
                up=triton.next_power_of_2(u),
                pieces=finest.per_byte,
                bits=seg.bits,
                a_off=first.offset,
                a_bits=first.bits,
                b_off=finest.offset if len(seg.planes) == 2 else -1,
            )
        )
    return RecordTiles(layout=layout, segments=tuple(segments))


@dataclass(frozen=True)
class KernelTensors:
    """Device tensors of one quantizer in the form the kernels read."""

    rotation: torch.Tensor  # (d, d) float32 R, contiguous
    qjl: torch.Tensor  # (d, d) float32 S (prod), else a (1,) placeholder
    codebook: torch.Tensor  # (32,) float32: centroids of segment i at [16 i, 16 i + 2**bits)
    boundaries: torch.Tensor  # (32,) float32: decision boundaries of segment i at [16 i, 16 i + 2**bits - 1)


_kernel_tensors: weakref.WeakKeyDictionary[TurboQuantizer, dict[torch.device, KernelTensors]] = (
    weakref.WeakKeyDictionary()
)


def kernel_tensors(quantizer: TurboQuantizer, device: torch.device) -> KernelTensors:
    """Built once per (quantizer, device); launchers call this on every step, so it must stay a dict lookup."""
    per_device = _kernel_tensors.setdefault(quantizer, {})
    if device not in per_device:
        t = quantizer.tensors(device)
        cb = torch.zeros(CODEBOOK_STRIDE * MAX_SEGMENTS, dtype=torch.float32, device=device)
        bnd = torch.zeros_like(cb)
        for i, (c, b) in enumerate(zip(t.centroids, t.boundaries, strict=True)):
            cb[CODEBOOK_STRIDE * i : CODEBOOK_STRIDE * i + c.numel()] = c
            bnd[CODEBOOK_STRIDE * i : CODEBOOK_STRIDE * i + b.numel()] = b
        per_device[device] = KernelTensors(
            rotation=t.rotation.float().contiguous(),
            qjl=(t.qjl if t.qjl is not None else torch.zeros(1, device=device)).float().contiguous(),
            codebook=cb,
            boundaries=bnd,
        )
    return per_device[device]


# ----------------------------------------------------------------------------------------------------- triton helpers


@triton.jit
def tile_channels(START: tl.constexpr, U: tl.constexpr, UP: tl.constexpr, PIECES: tl.constexpr):
    """Channel of each tile column (PIECES * UP,) and whether the column is a real channel."""
    pos = tl.arange(0, PIECES * UP)
    j = pos % UP
    return START + (pos // UP) * U + j, j < U


@triton.jit
def load_codes(
    rec,
    mask,
    U: tl.constexpr,
    UP: tl.constexpr,
    PIECES: tl.constexpr,
    BITS: tl.constexpr,
    A_OFF: tl.constexpr,
    A_BITS: tl.constexpr,
    B_OFF: tl.constexpr,
):
    """Codes (rows, PIECES * UP) int32 of one segment; rec (rows,) record pointers, mask (rows, PIECES * UP)."""
    pos = tl.arange(0, PIECES * UP)
    piece = pos // UP
    j = pos % UP
    M_A: tl.constexpr = A_BITS * PIECES // 8
    a = tl.load(rec[:, None] + (A_OFF + (piece % M_A) * U + j)[None, :], mask=mask, other=0).to(tl.int32)
    codes = (a >> ((piece // M_A) * A_BITS)[None, :]) & ((1 << A_BITS) - 1)
    if BITS > A_BITS:
        # The high bit of a 3-bit code: a 1-bit plane, the finest one, so its byte is j and its shift the piece.
        b = tl.load(rec[:, None] + (B_OFF + j)[None, :], mask=mask, other=0).to(tl.int32)
        codes |= ((b >> piece[None, :]) & 1) << A_BITS
    return codes


@triton.jit
def load_segment(
    rec,
    row_mask,
    cb_ptr,
    SEG: tl.constexpr,
    RAW: tl.constexpr,
    U: tl.constexpr,
    UP: tl.constexpr,
    PIECES: tl.constexpr,
    BITS: tl.constexpr,
    A_OFF: tl.constexpr,
    A_BITS: tl.constexpr,
    B_OFF: tl.constexpr,
):
    """Rotated-domain values of one segment, (rows, PIECES * UP) float32: centroids c[idx] (norm not applied),
    or the bf16 vector of a raw record. Padded columns and masked rows are 0."""
    pos = tl.arange(0, PIECES * UP)
    mask = row_mask[:, None] & ((pos % UP) < U)[None, :]
    if RAW:
        lo = tl.load(rec[:, None] + 2 * pos[None, :], mask=mask, other=0).to(tl.uint16)
        hi = tl.load(rec[:, None] + 2 * pos[None, :] + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        codes = load_codes(rec, mask, U, UP, PIECES, BITS, A_OFF, A_BITS, B_OFF)
        return tl.load(cb_ptr + SEG * 16 + codes, mask=mask, other=0.0)  # 16 = CODEBOOK_STRIDE


@triton.jit
def load_signs(rec, row_mask, QJL_OFF: tl.constexpr, U8: tl.constexpr, UP8: tl.constexpr):
    """QJL signs as +-1.0, (rows, 8 * UP8) float32 in tile order (PIECES = 8); padded columns and masked rows 0."""
    pos = tl.arange(0, 8 * UP8)
    j = pos % UP8
    mask = row_mask[:, None] & (j < U8)[None, :]
    bits = tl.load(rec[:, None] + (QJL_OFF + j)[None, :], mask=mask, other=0).to(tl.int32)
    bit = (bits >> (pos // UP8)[None, :]) & 1
    return tl.where(mask, bit.to(tl.float32) * 2.0 - 1.0, 0.0)


@triton.jit
def pack_plane(values, ROWS: tl.constexpr, BITS: tl.constexpr, PIECES: tl.constexpr, UP: tl.constexpr):
    """Plane values (rows, PIECES * UP) int32 < 2**BITS in tile order -> the plane's bytes (rows, M * UP) int32,
    M = BITS * PIECES / 8: column h * UP + j of the result is byte h * U + j of the plane."""
    M: tl.constexpr = BITS * PIECES // 8
    PER_BYTE: tl.constexpr = 8 // BITS
    shifts = (tl.arange(0, PER_BYTE) * BITS)[None, :, None, None]
    blocks = tl.reshape(values, (ROWS, PER_BYTE, M, UP))
    # The shifted values occupy disjoint bits, so the sum is the bitwise or.
    return tl.reshape(tl.sum(blocks << shifts, axis=1), (ROWS, M * UP))


@triton.jit
def soft_cap(scores, logit_cap):
    """logit_cap * tanh(scores / logit_cap), the cap SGLang applies after sm_scale; tanh(x) = 2 sigmoid(2x) - 1 as in
    SGLang's Triton kernels (no libdevice call needed)."""
    return logit_cap * (2.0 * tl.sigmoid(2.0 * scores / logit_cap) - 1.0)


@triton.jit
def load_query(row, row_mask, START: tl.constexpr, U: tl.constexpr, UP: tl.constexpr, PIECES: tl.constexpr):
    """Rows (rows, PIECES * UP) float32 of a float32 (.., head_dim) tensor gathered into one segment's tile order."""
    chan, valid = tile_channels(START, U, UP, PIECES)
    return tl.load(row[:, None] + chan[None, :], mask=row_mask[:, None] & valid[None, :], other=0.0)


@triton.jit
def store_rows(row, row_mask, tile, START: tl.constexpr, U: tl.constexpr, UP: tl.constexpr, PIECES: tl.constexpr):
    """Scatter a tile in one segment's order back to channel order (padded columns are dropped)."""
    chan, valid = tile_channels(START, U, UP, PIECES)
    tl.store(row[:, None] + chan[None, :], tile, mask=row_mask[:, None] & valid[None, :])


@triton.jit
def attend_tile(
    q0,
    q1,
    qq,
    m_i,
    l_i,
    acc0,
    acc1,
    accq,
    k_rec,
    v_rec,
    k_nrm,
    v_nrm,
    n_mask,
    visible,
    k_cb_ptr,
    v_cb_ptr,
    sm_scale,
    logit_cap,
    HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RAW: tl.constexpr,
    K_NSEG: tl.constexpr,
    K_PROD: tl.constexpr,
    K_QJL_OFF: tl.constexpr,
    K_U8: tl.constexpr,
    K_UP8: tl.constexpr,
    K_S0_START: tl.constexpr,
    K_S0_U: tl.constexpr,
    K_S0_UP: tl.constexpr,
    K_S0_PIECES: tl.constexpr,
    K_S0_BITS: tl.constexpr,
    K_S0_A_OFF: tl.constexpr,
    K_S0_A_BITS: tl.constexpr,
    K_S0_B_OFF: tl.constexpr,
    K_S1_START: tl.constexpr,
    K_S1_U: tl.constexpr,
    K_S1_UP: tl.constexpr,
    K_S1_PIECES: tl.constexpr,
    K_S1_BITS: tl.constexpr,
    K_S1_A_OFF: tl.constexpr,
    K_S1_A_BITS: tl.constexpr,
    K_S1_B_OFF: tl.constexpr,
    V_RAW: tl.constexpr,
    V_NSEG: tl.constexpr,
    V_PROD: tl.constexpr,
    V_QJL_OFF: tl.constexpr,
    V_U8: tl.constexpr,
    V_UP8: tl.constexpr,
    V_S0_START: tl.constexpr,
    V_S0_U: tl.constexpr,
    V_S0_UP: tl.constexpr,
    V_S0_PIECES: tl.constexpr,
    V_S0_BITS: tl.constexpr,
    V_S0_A_OFF: tl.constexpr,
    V_S0_A_BITS: tl.constexpr,
    V_S0_B_OFF: tl.constexpr,
    V_S1_START: tl.constexpr,
    V_S1_U: tl.constexpr,
    V_S1_UP: tl.constexpr,
    V_S1_PIECES: tl.constexpr,
    V_S1_BITS: tl.constexpr,
    V_S1_A_OFF: tl.constexpr,
    V_S1_A_BITS: tl.constexpr,
    V_S1_B_OFF: tl.constexpr,
):
    """One step of the online softmax over a tile of BLOCK_N packed keys/values (reference.attend_packed's math).

    q0, q1 (rows, W): R q in the tile order of K's segments; qq (rows, 8 * K_UP8): sqrt(pi/2)/d * S R q (prod K).
    k_rec, v_rec (BLOCK_N,) code row pointers, k_nrm, v_nrm (BLOCK_N,) pointers to their norms, n_mask (BLOCK_N,)
    which keys exist, visible (rows or 1, BLOCK_N) which a row may see. Returns the updated (m_i, l_i, acc0, acc1,
    accq); accumulators stay in the rotated domain, scaled by nothing but the softmax weights (the norms are applied
    to p, not to the value tile: rows x N multiplies, not N x W). Arguments of absent parts (second segment, QJL) are
    placeholders and come back untouched.
    """
    k = load_segment(k_rec, n_mask, k_cb_ptr, 0, K_RAW, K_S0_U, K_S0_UP, K_S0_PIECES, K_S0_BITS, K_S0_A_OFF,
                     K_S0_A_BITS, K_S0_B_OFF)  # fmt: skip
    s = tl.dot(q0, tl.trans(k), input_precision=PRECISION)
    if K_NSEG == 2:
        k1 = load_segment(k_rec, n_mask, k_cb_ptr, 1, K_RAW, K_S1_U, K_S1_UP, K_S1_PIECES, K_S1_BITS, K_S1_A_OFF,
                          K_S1_A_BITS, K_S1_B_OFF)  # fmt: skip
        s += tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
    if not K_RAW:
        k_norm = tl.load(k_nrm, mask=n_mask, other=0.0).to(tl.float32)
        s = s * k_norm[None, :]
        if K_PROD:
            k_signs = load_signs(k_rec, n_mask, K_QJL_OFF, K_U8, K_UP8)
            k_gamma = tl.load(k_nrm + 1, mask=n_mask, other=0.0).to(tl.float32)
            s += tl.dot(qq, tl.trans(k_signs), input_precision=PRECISION) * (k_norm * k_gamma)[None, :]
    s = s * sm_scale
    if HAS_CAP:
        s = soft_cap(s, logit_cap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    v = load_segment(v_rec, n_mask, v_cb_ptr, 0, V_RAW, V_S0_U, V_S0_UP, V_S0_PIECES, V_S0_BITS, V_S0_A_OFF,
                     V_S0_A_BITS, V_S0_B_OFF)  # fmt: skip
    if V_RAW:
        pv = p
    else:
        v_norm = tl.load(v_nrm, mask=n_mask, other=0.0).to(tl.float32)
        pv = p * v_norm[None, :]
    acc0 = acc0 * alpha[:, None] + tl.dot(pv, v, input_precision=PRECISION)
    if V_NSEG == 2:
        v1 = load_segment(v_rec, n_mask, v_cb_ptr, 1, V_RAW, V_S1_U, V_S1_UP, V_S1_PIECES, V_S1_BITS, V_S1_A_OFF,
                          V_S1_A_BITS, V_S1_B_OFF)  # fmt: skip
        acc1 = acc1 * alpha[:, None] + tl.dot(pv, v1, input_precision=PRECISION)
    if V_PROD:
        v_signs = load_signs(v_rec, n_mask, V_QJL_OFF, V_U8, V_UP8)
        v_gamma = tl.load(v_nrm + 1, mask=n_mask, other=0.0).to(tl.float32)
        accq = accq * alpha[:, None] + tl.dot(pv * v_gamma[None, :], v_signs, input_precision=PRECISION)
    return m_new, l_i, acc0, acc1, accq


# ---------------------------------------------------------------------------------------------------- launcher checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def check_pool(name: str, pool: PackedVectors, layout: VectorLayout, num_kv_heads: int | None = None) -> None:
    """A pool must be PackedVectors of `layout`, (slots, kv_heads), each code row and norm pair contiguous."""
    if not isinstance(pool, PackedVectors):
        raise TypeError(f"{name}: expected PackedVectors (codes, norms) of {layout}, got {type(pool).__name__}")
    pool.check(name, layout, dims=2)
    if pool.codes.stride(-1) != 1 or pool.norms.stride(-1) != 1:
        raise ValueError(
            f"{name}: code rows and norms must be contiguous, got strides {pool.codes.stride()}, {pool.norms.stride()}"
        )
    if num_kv_heads is not None and pool.shape[1] != num_kv_heads:
        raise ValueError(f"{name} has {pool.shape[1]} KV heads, expected {num_kv_heads}")


def check_index_tensor(name: str, index: torch.Tensor) -> None:
    if index.dtype not in INDEX_DTYPES or index.dim() != 1 or (index.numel() > 1 and index.stride(0) != 1):
        raise ValueError(
            f"{name}: expected a contiguous 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}"
        )


def check_slots(name: str, slots: torch.Tensor, num_slots: int) -> None:
    """Every slot index must address the pool: a wrong one would read or corrupt other memory. Syncs the device."""
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= num_slots:
            raise IndexError(f"{name} holds slots in [{lo}, {hi}] but the pool has {num_slots} slots")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def check_precision(dot_precision: str) -> None:
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"unsupported dot_precision {dot_precision!r}: supported values are {DOT_PRECISIONS}")


def check_launch(**params: int) -> None:
    """Block sizes must be powers of two (tl.arange), and tl.dot needs at least 16 rows and columns."""
    for name, value in params.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@dataclass(frozen=True)
class AttentionLaunch:
    """What decode and extend launchers share once the inputs are checked."""

    device: torch.device
    group: int  # query heads per KV head
    q_rot: torch.Tensor  # (rows, q_heads, d) float32, R q
    q_qjl: torch.Tensor  # (rows, q_heads, d) float32, sqrt(pi/2)/d * S R q for a prod K, else q_rot (unused)
    k_tensors: KernelTensors
    v_tensors: KernelTensors
    constexprs: dict[str, int]  # K_* and V_* of the two layouts
    out_width: int  # columns of the rotated-domain output: d, or 2 d when V is prod (values | QJL sums)


def prepare_attention(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    *,
    dot_precision: str,
    check_indices: bool,
) -> AttentionLaunch:
    """Check what decode and extend share (raising before any kernel can read out of bounds), rotate the query."""
    k_lay, v_lay = k_quantizer.layout, v_quantizer.layout
    if k_lay.head_dim != v_lay.head_dim:
        raise ValueError(f"K and V quantizers disagree on head_dim: {k_lay.head_dim} vs {v_lay.head_dim}")
    k_tiles, v_tiles = record_tiles(k_lay), record_tiles(v_lay)
    check_pool("k_pool", k_pool, k_lay)
    check_pool("v_pool", v_pool, v_lay, k_pool.shape[1])
    if q.dim() != 3 or q.shape[-1] != k_lay.head_dim:
        raise ValueError(f"q must be (rows, q_heads, {k_lay.head_dim}), got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    if q.stride(-1) != 1:
        raise ValueError(f"q: head_dim must be contiguous, got strides {q.stride()}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of the pool's KV heads ({k_pool.shape[1]})")
    check_index_tensor("kv_indptr", kv_indptr)
    check_index_tensor("kv_indices", kv_indices)
    if kv_indptr.numel() < 1:
        raise ValueError("kv_indptr must have batch + 1 entries, got an empty tensor")
    device = check_same_device(
        q=q,
        k_codes=k_pool.codes,
        k_norms=k_pool.norms,
        v_codes=v_pool.codes,
        v_norms=v_pool.norms,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
    )
    check_precision(dot_precision)
    if check_indices:
        if bool((kv_indptr[1:] < kv_indptr[:-1]).any()) or int(kv_indptr[0]) < 0:
            raise ValueError(f"kv_indptr must be non-negative and non-decreasing, got {kv_indptr.tolist()}")
        end = int(kv_indptr[-1])
        if end > kv_indices.numel():
            raise ValueError(f"kv_indptr (ends at {end}) overruns kv_indices ({kv_indices.numel()})")
        check_slots("kv_indices", kv_indices[:end], min(k_pool.shape[0], v_pool.shape[0]))
    q_rot, q_qjl = k_quantizer.rotate_query(q)
    q_qjl = q_rot if q_qjl is None else q_qjl * k_quantizer.qjl_scale
    return AttentionLaunch(
        device=device,
        group=q.shape[1] // k_pool.shape[1],
        q_rot=q_rot.contiguous(),
        q_qjl=q_qjl.contiguous(),
        k_tensors=kernel_tensors(k_quantizer, device),
        v_tensors=kernel_tensors(v_quantizer, device),
        constexprs={**k_tiles.constexprs("K"), **v_tiles.constexprs("V")},
        out_width=2 * v_lay.head_dim if v_lay.variant == "prod" and not v_lay.is_raw else v_lay.head_dim,
    )


def unrotate(out: torch.Tensor, v_quantizer: TurboQuantizer, dtype: torch.dtype) -> torch.Tensor:
    """Rotated-domain output (rows, heads, out_width) float32 -> original domain in `dtype`, once per step."""
    d = v_quantizer.layout.head_dim
    acc_qjl = out[..., d:] * v_quantizer.qjl_scale if out.shape[-1] > d else None
    return v_quantizer.unrotate_output(out[..., :d], acc_qjl).to(dtype)
