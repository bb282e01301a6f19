"""What the Triton kernels share: how packed code rows (layout.py, packed.py) become bf16 register tiles.

A record's code row is read as up to three *parts*: the Lloyd-Max codes of segment 0, of segment 1 (fractional
bits), and the QJL sign plane (prod); a raw (16-bit) layout is one part, the bf16 vector itself. A part of n channels
whose finest plane has p bits is U = n * p / 8 bytes; byte j holds the channels start + piece * U + j, piece < 8 / p.
The kernels decode a part byte by byte, in *byte-major* tile order:

    tile column  j * PIECES + piece   <->   channel  start + piece * U + j          (j < U; U padded to UP)

Each byte is loaded once (a code row is 16-byte aligned: whole rows come in 16-byte loads) and expanded in
registers through a *pair table*: entry (byte, e) holds the bf16 values of pieces 2e and 2e + 1 packed in one int32,
so one lookup yields two coordinates, already in the pair order a bf16 dot operand wants (a 4-bit byte is one
lookup; a 2-bit byte two; a 3-bit code, a 2-bit and a 1-bit plane, indexes a 128-entry table by two crumbs and
their two high bits). The tables live in registers and are read with tl.gather (shared memory on a GPU). The
query is permuted into the same column order by the launcher (once per step), the value accumulator lives in it,
and the launcher maps it back; padded columns (j >= U: head_dim 80/96) carry zero query weight and are dropped.

Dots take bf16 operands with float32 accumulation (dot_precision "bf16": the 2^-9 rounding of a centroid is far
below the 2-4 bit quantization error); "ieee", "tf32" and "tf32x3" read float32 centroid tables instead, for an exact
comparison with the torch reference. Under the Triton interpreter bf16 operands are cast to float32 before tl.dot
(the interpreter multiplies bf16 dots wrongly).

A layout reaches a kernel as one compile-time RecordSpec (a NamedTuple of PartSpecs), built here from the
VectorLayout, never as loose integers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_checks import FLOAT_DTYPES, check_index_tensor, check_kv_indptr, check_pool, check_same_device
from .layout import VectorLayout
from .packed import PackedVectors
from .quantizer import TurboQuantizer

ABSENT: tl.constexpr = tl.constexpr(0)
TABLE: tl.constexpr = tl.constexpr(1)  # one plane of 1, 2 or 4 bits: pair table indexed by byte * PAIRS + e
SPLIT3: tl.constexpr = tl.constexpr(2)  # 3-bit codes: a 2-bit plane and a 1-bit plane, 128-entry pair table
RAW: tl.constexpr = tl.constexpr(3)  # the bf16 vector itself


class PartSpec(NamedTuple):
    """One decoded part of a code row (see the module docstring). Host-only fields: start, channels."""

    kind: int = 0
    offset: int = 0  # first byte of the (low) plane in the code row; for RAW, the first element
    high_offset: int = 0  # SPLIT3: first byte of the 1-bit plane
    u: int = 1  # bytes per piece run (real)
    up: int = 1  # u padded to a power of two
    pieces: int = 2  # values per byte
    bits: int = 4  # width of one field of a TABLE plane
    pairs: int = 1  # table entries per byte (pieces / 2)
    table: int = 0  # first entry of this part's pair table in the record's table
    col: int = 0  # first column of this part in the record's tile vector (query / output)
    width: int = 1  # tile columns: up * pieces
    start: int = 0  # first channel


class RecordSpec(NamedTuple):
    """The compile-time description of one VectorLayout's code rows and norms."""

    seg0: PartSpec
    seg1: PartSpec
    signs: PartSpec  # prod: QJL signs, scaled by n * gamma; else absent
    norms: int  # norms per vector: 0 raw, 1 mse (n), 2 prod (n, gamma)
    width: int  # total tile columns of the parts
    table_size: int  # entries of the record's pair table (a power of two)


MAX_SEGMENTS = 2
SPLIT3_TABLE = 128  # entries of a 3-bit part's pair table: index = two crumbs | their high bits at bits 4 and 6


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


def _table_part(plane_offset: int, bits: int, channels: int, start: int, table: int, col: int) -> PartSpec:
    pieces = 8 // bits
    u = channels * bits // 8
    up = triton.next_power_of_2(u)
    return PartSpec(TABLE.value, plane_offset, 0, u, up, pieces, bits, pieces // 2, table, col, up * pieces, start)


@cache
def record_spec(layout: VectorLayout) -> RecordSpec:
    """The RecordSpec of `layout`; raises ValueError for layouts the kernels were not built for."""
    reason = unsupported_reason(layout)
    if reason is not None:
        raise ValueError(
            f"the TurboQuant Triton kernels do not support {layout}: {reason}; use the torch reference "
            "(tq_serve.kernels.reference) for this layer"
        )
    d = layout.head_dim
    absent = PartSpec()
    if layout.is_raw:
        up = triton.next_power_of_2(d)
        raw = PartSpec(RAW.value, 0, 0, d, up, 1, 16, 1, 0, 0, up, 0)
        return RecordSpec(raw, absent, absent, 0, up, 2)
    parts, table, col = [], 0, 0
    for seg in layout.segments:
        low = seg.planes[0]
        if len(seg.planes) == 1:
            part = _table_part(low.offset, low.bits, seg.channels, seg.start, table, col)
            table += 256 * part.pairs
        else:
            u = low.nbytes
            up = triton.next_power_of_2(u)
            part = PartSpec(
                SPLIT3.value, low.offset, seg.planes[1].offset, u, up, 4, 2, 2, table, col, 4 * up, seg.start
            )
            table += SPLIT3_TABLE
        parts.append(part)
        col += part.width
    seg1 = parts[1] if len(parts) > 1 else absent
    signs = absent
    if layout.variant == "prod":
        signs = _table_part(layout.qjl_offset, 1, d, 0, table, col)
        table += 256 * signs.pairs
        col += signs.width
    return RecordSpec(parts[0], seg1, signs, layout.norms_per_vector, col, triton.next_power_of_2(table))


# ----------------------------------------------------------------------------------------------- host-side tensors


def part_channels(part: PartSpec) -> torch.Tensor:
    """Channel of each tile column of `part` (width,), -1 for padded columns."""
    col = torch.arange(part.width)
    j, piece = col // part.pieces, col % part.pieces
    return torch.where(j < part.u, part.start + piece * part.u + j, -1)


def _pair_entries(part: PartSpec, values: torch.Tensor) -> torch.Tensor:
    """The pair table of one part as (entries, 2) float32: entry i -> values of its two columns."""
    if part.kind == SPLIT3.value:
        i = torch.arange(SPLIT3_TABLE)
        lo = (i & 3) | (((i >> 4) & 1) << 2)
        hi = ((i >> 2) & 3) | (((i >> 6) & 1) << 2)
        return torch.stack([values[lo], values[hi]], dim=1)
    byte, e = torch.arange(256).repeat_interleave(part.pairs), torch.arange(part.pairs).repeat(256)
    mask = (1 << part.bits) - 1
    lo = (byte >> (2 * e * part.bits)) & mask
    hi = (byte >> ((2 * e + 1) * part.bits)) & mask
    return torch.stack([values[lo], values[hi]], dim=1)


@dataclass(frozen=True)
class TileColumns:
    """Which tile columns hold which channels: (n,) int64 each, padded columns left out; `width` columns in all.
    Index tensors, not masks: moving a query into tile order and an output back is then index_select/index_copy_,
    which never syncs the device (a launch inside a CUDA graph capture must not)."""

    width: int
    tile: torch.Tensor
    channel: torch.Tensor

    @classmethod
    def of(cls, channels: torch.Tensor, device: torch.device) -> TileColumns:
        """From part_channels (-1 for padding)."""
        valid = channels >= 0
        tile = torch.arange(channels.numel())[valid]
        return cls(channels.numel(), tile.to(device), channels[valid].to(device))


@dataclass(frozen=True)
class KernelTensors:
    """Per (quantizer, device): what the kernels read besides the pool."""

    pairs_bf16: torch.Tensor  # (table_size,) int32: bf16 of the lower column | bf16 of the upper column << 16
    pairs_f32: torch.Tensor  # (2 * table_size,) float32: the same pairs, exact
    columns: TileColumns  # the code parts' tile columns
    sign_columns: TileColumns  # the QJL sign part's (no columns without QJL)
    rotation: torch.Tensor  # (d, d) float32
    qjl: torch.Tensor  # (d, d) float32 S (prod), else (1,)
    codebook: torch.Tensor  # (16 * MAX_SEGMENTS,) float32, segment i at 16 i
    boundaries: torch.Tensor  # (16 * MAX_SEGMENTS,) float32


CODEBOOK_STRIDE = 16
_kernel_tensors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernel_tensors(quantizer: TurboQuantizer, device: torch.device) -> KernelTensors:
    """Built once per (quantizer, device); launchers call this on every step, so it must stay a dict lookup."""
    per_device = _kernel_tensors.setdefault(quantizer, {})
    if device not in per_device:
        spec = record_spec(quantizer.layout)
        t = quantizer.tensors("cpu")
        pairs = torch.zeros(spec.table_size, 2, dtype=torch.float32)
        seg_parts = [p for p in (spec.seg0, spec.seg1) if p.kind in (TABLE.value, SPLIT3.value)]
        for part, values in zip(seg_parts, t.centroids, strict=True):
            entries = _pair_entries(part, values.float())
            pairs[part.table : part.table + entries.shape[0]] = entries
        if spec.signs.kind:
            entries = _pair_entries(spec.signs, torch.tensor([-1.0, 1.0]))
            pairs[spec.signs.table : spec.signs.table + entries.shape[0]] = entries
        halves = pairs.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
        packed = halves[:, 0] | (halves[:, 1] << 16)
        cb = torch.zeros(CODEBOOK_STRIDE * MAX_SEGMENTS, dtype=torch.float32)
        bnd = torch.zeros_like(cb)
        for i, (c, b) in enumerate(zip(t.centroids, t.boundaries, strict=True)):
            cb[CODEBOOK_STRIDE * i : CODEBOOK_STRIDE * i + c.numel()] = c
            bnd[CODEBOOK_STRIDE * i : CODEBOOK_STRIDE * i + b.numel()] = b
        columns = torch.cat([part_channels(p) for p in (spec.seg0, spec.seg1) if p.kind])
        signs = part_channels(spec.signs) if spec.signs.kind else torch.zeros(0, dtype=torch.long)
        per_device[device] = KernelTensors(
            pairs_bf16=((packed + 2**31) % 2**32 - 2**31).to(torch.int32).to(device),
            pairs_f32=pairs.reshape(-1).to(device),
            columns=TileColumns.of(columns, device),
            sign_columns=TileColumns.of(signs, device),
            rotation=t.rotation.float().contiguous().to(device),
            qjl=(t.qjl if t.qjl is not None else torch.zeros(1)).float().contiguous().to(device),
            codebook=cb.to(device),
            boundaries=bnd.to(device),
        )
    return per_device[device]


def to_tiles(x: torch.Tensor, columns: TileColumns) -> torch.Tensor:
    """(..., d) -> (..., columns.width) in tile order, zeros in padded columns."""
    out = x.new_zeros(*x.shape[:-1], columns.width)
    return out.index_copy_(-1, columns.tile, x.index_select(-1, columns.channel))


def from_tiles(t: torch.Tensor, columns: TileColumns, d: int) -> torch.Tensor:
    """(..., columns.width) in tile order -> (..., d) (padded columns dropped)."""
    out = t.new_zeros(*t.shape[:-1], d)
    return out.index_copy_(-1, columns.channel, t.index_select(-1, columns.tile))


# ----------------------------------------------------------------------------------------------------- triton helpers


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """a @ b with float32 accumulation: bf16 operands, or float32 operands at input_precision PRECISION."""
    if PRECISION == "bf16":
        if INTERPRETER:
            out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return out


# Under TRITON_INTERPRET=1, @triton.jit yields interpreted functions: the launchers pass this to the kernels.
INTERPRETED = not isinstance(dot, triton.runtime.JITFunction)


@triton.jit
def load_table(pairs_bf16_ptr, pairs_f32_ptr, SPEC: tl.constexpr, EXACT: tl.constexpr):
    """The record's pair table into registers: (table_size,) int32 packed bf16 pairs, or (2 table_size,) float32."""
    if EXACT:
        return tl.load(pairs_f32_ptr + tl.arange(0, 2 * SPEC.table_size))
    return tl.load(pairs_bf16_ptr + tl.arange(0, SPEC.table_size))


@triton.jit
def _lookup(table, idx, SHAPE: tl.constexpr, SIZE: tl.constexpr):
    return tl.reshape(tl.gather(table, tl.reshape(idx, (SIZE,)), 0), SHAPE)


@triton.jit
def part_values(row, n_mask, table, SPEC: tl.constexpr, INDEX: tl.constexpr, ROWS: tl.constexpr, EXACT: tl.constexpr):
    """Values of part INDEX (0 seg0, 1 seg1, 2 signs) of a RecordSpec, for ROWS code rows at pointers row (ROWS,):
    (ROWS, PART.width), bf16 (float32 if EXACT),
    in byte-major tile order. Masked rows and padded columns hold table entries of byte 0 (finite): the caller gives
    them zero weight. A RAW part's `row` points to the values themselves (bf16 vectors, or triton_extend's scratch)."""
    if INDEX == 0:
        PART: tl.constexpr = SPEC.seg0
    elif INDEX == 1:
        PART: tl.constexpr = SPEC.seg1
    else:
        PART: tl.constexpr = SPEC.signs
    j = tl.arange(0, PART.up)
    mask = n_mask[:, None] & (j < PART.u)[None, :]
    if PART.kind == RAW:
        values = tl.load(row[:, None] + (PART.offset + j)[None, :], mask=mask, other=0.0)
        if EXACT:
            values = values.to(tl.float32)
    else:
        b = tl.load(row[:, None] + (PART.offset + j)[None, :], mask=mask, other=0).to(tl.int32)
        e = tl.arange(0, PART.pairs)
        if PART.kind == SPLIT3:
            # The high bit of column (j, piece) sits in byte j % u1 of the 1-bit plane at bit j // u1 + 2 piece.
            u1: tl.constexpr = PART.u // 2
            if PART.u == PART.up:
                # Load the u1 high bytes once and lay them out as j = t * u1 + j' (t = j // u1), pre-shifted by t.
                j1 = tl.arange(0, u1)
                hb = tl.load(row[:, None] + (PART.high_offset + j1)[None, :], mask=n_mask[:, None], other=0)
                hb = hb.to(tl.int32)
                up: tl.constexpr = PART.up
                h = tl.reshape(tl.permute(tl.join(hb, hb >> 1), (0, 2, 1)), (ROWS, up))
            else:
                h = tl.load(row[:, None] + (PART.high_offset + j % u1)[None, :], mask=mask, other=0).to(tl.int32)
                h = h >> (j // u1)[None, :]
            # pair e: two crumbs (bits 4e..4e+3 of the low byte) and their high bits (bits 4e and 4e + 2 of h),
            # indexed as crumbs | high bits at 4 and 6 (a 128-entry table with holes)
            shift = (4 * e)[None, None, :]
            idx = ((b[:, :, None] >> shift) & 15) | (((h[:, :, None] >> shift) & 5) << 4)
        else:
            idx = b[:, :, None] * PART.pairs + e[None, None, :]
        idx += PART.table
        shape: tl.constexpr = (ROWS, PART.up, PART.pairs)
        size: tl.constexpr = ROWS * PART.up * PART.pairs
        if EXACT:
            lo = _lookup(table, 2 * idx, shape, size)
            hi = _lookup(table, 2 * idx + 1, shape, size)
        else:
            pair = _lookup(table, idx, shape, size)
            lo = (pair & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            hi = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        width: tl.constexpr = PART.width
        values = tl.reshape(tl.join(lo, hi), (ROWS, width))
    return values


@triton.jit
def load_part(row, row_mask, SPEC: tl.constexpr, INDEX: tl.constexpr):
    """Part INDEX's columns (rows, PART.width) of a tile-ordered float32 tensor: row (rows,) points at each row's
    columns. A part is passed as (spec, index), not as a nested NamedTuple: Triton 3.6 does not take those as
    arguments."""
    if INDEX == 0:
        PART: tl.constexpr = SPEC.seg0
    elif INDEX == 1:
        PART: tl.constexpr = SPEC.seg1
    else:
        PART: tl.constexpr = SPEC.signs
    cols = tl.arange(0, PART.width)
    return tl.load(row[:, None] + (PART.col + cols)[None, :], mask=row_mask[:, None], other=0.0)


@triton.jit
def store_part(row, row_mask, tile, SPEC: tl.constexpr, INDEX: tl.constexpr):
    if INDEX == 0:
        PART: tl.constexpr = SPEC.seg0
    elif INDEX == 1:
        PART: tl.constexpr = SPEC.seg1
    else:
        PART: tl.constexpr = SPEC.signs
    cols = tl.arange(0, PART.width)
    tl.store(row[:, None] + (PART.col + cols)[None, :], tile, mask=row_mask[:, None])


@triton.jit
def soft_cap(scores, logit_cap):
    """logit_cap * tanh(scores / logit_cap), the cap SGLang applies after sm_scale; tanh(x) = 2 sigmoid(2x) - 1 as in
    SGLang's Triton kernels (no libdevice call needed)."""
    return logit_cap * (2.0 * tl.sigmoid(2.0 * scores / logit_cap) - 1.0)


@triton.jit
def attend_tile(
    q0,
    q1,
    qs,
    m_i,
    l_i,
    acc0,
    acc1,
    accs,
    k_row,
    v_row,
    k_norm,
    v_norm,
    n_mask,
    visible,
    k_table,
    v_table,
    logit_cap,
    K: tl.constexpr,
    V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    GUARD: tl.constexpr,
):
    """One step of the online softmax over BLOCK_N packed keys/values (reference.attend_packed's math).

    q0, q1, qs (rows, part width): sm_scale * R q in the tile order of K's parts (qs: also times the QJL scale, S R q).
    k_row, v_row (BLOCK_N,) code-row pointers, k_norm, v_norm (BLOCK_N,) pointers to each vector's norms,
    n_mask (BLOCK_N,) which keys exist, visible (rows or 1, BLOCK_N) which a row may see. Accumulators stay in the
    rotated domain in V's tile order; the norms scale p (rows x N multiplies), never the value tile. Absent parts'
    arguments are placeholders and come back untouched. GUARD: a row may have seen no key yet after this tile (a
    sliding window's first tiles), so its max stays -inf and is shifted by 0 instead (no NaN from -inf + inf).
    """
    EXACT: tl.constexpr = PRECISION != "bf16"
    k = part_values(k_row, n_mask, k_table, K, 0, BLOCK_N, EXACT)
    s = dot(q0, tl.trans(k), PRECISION, INTERPRETER)
    if K.seg1.kind != ABSENT:
        k1 = part_values(k_row, n_mask, k_table, K, 1, BLOCK_N, EXACT)
        s += dot(q1, tl.trans(k1), PRECISION, INTERPRETER)
    if K.norms > 0:
        kn = tl.load(k_norm, mask=n_mask, other=0.0).to(tl.float32)
        s = s * kn[None, :]
    if K.signs.kind != ABSENT:
        ks = part_values(k_row, n_mask, k_table, K, 2, BLOCK_N, EXACT)
        s_qjl = dot(qs, tl.trans(ks), PRECISION, INTERPRETER)
        if K.norms > 0:
            s_qjl = s_qjl * (kn * tl.load(k_norm + 1, mask=n_mask, other=0.0).to(tl.float32))[None, :]
        s += s_qjl
    if HAS_CAP:
        s = soft_cap(s, logit_cap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if GUARD:  # a row that has seen no key yet keeps m = -inf: its p and alpha are then 0, not exp(-inf + inf)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    alpha = tl.exp(m_i - m_shift)
    p = tl.exp(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    pv = p
    if V.norms > 0:
        vn = tl.load(v_norm, mask=n_mask, other=0.0).to(tl.float32)
        pv = p * vn[None, :]
    v = part_values(v_row, n_mask, v_table, V, 0, BLOCK_N, EXACT)
    acc0 = acc0 * alpha[:, None] + dot(pv, v, PRECISION, INTERPRETER)
    if V.seg1.kind != ABSENT:
        v1 = part_values(v_row, n_mask, v_table, V, 1, BLOCK_N, EXACT)
        acc1 = acc1 * alpha[:, None] + dot(pv, v1, PRECISION, INTERPRETER)
    if V.signs.kind != ABSENT:
        vs = part_values(v_row, n_mask, v_table, V, 2, BLOCK_N, EXACT)
        pvs = pv
        if V.norms > 0:
            pvs = pv * tl.load(v_norm + 1, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        accs = accs * alpha[:, None] + dot(pvs, vs, PRECISION, INTERPRETER)
    return m_new, l_i, acc0, acc1, accs


# ---------------------------------------------------------------------------------------------------- launcher checks


def window_arg(sliding_window_size: int | None) -> int:
    """SGLang's sliding_window_size as the kernels' runtime window argument: -1 for none."""
    if sliding_window_size is None or sliding_window_size < 0:
        return -1
    return min(int(sliding_window_size), 2**31 - 1)


DOT_PRECISIONS = ("bf16", "ieee", "tf32", "tf32x3")
# Attention against the torch reference on the same packed data, as a fraction of the largest output: float32 dots
# differ by summation order only; bf16 operands round R q, the centroids and p to 8 bits (2^-9 relative each),
# which moves an output by up to ~1% of the largest.
ATTENTION_TOL = {"ieee": 1e-3, "tf32x3": 1e-3, "tf32": 5e-3, "bf16": 2e-2}


def attention_mismatch(out: torch.Tensor, ref: torch.Tensor, dot_precision: str) -> str | None:
    """None when a kernel's attention output matches the reference within the tolerance of its dot precision."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"shape/dtype {tuple(out.shape)} {out.dtype} vs reference {tuple(ref.shape)} {ref.dtype}"
    if not torch.isfinite(out.float()).all():
        return "non-finite outputs"
    scale = max(ref.float().abs().max().item(), 1e-6)
    err = (out.float() - ref.float()).abs().max().item() / scale
    tol = ATTENTION_TOL[dot_precision] + (2**-8 if ref.dtype == torch.bfloat16 else 0.0)
    return None if err <= tol else f"max error {err:.2e} of the largest output > {tol:.1e} ({dot_precision} dots)"


def check_precision(dot_precision: str) -> None:
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"unsupported dot_precision {dot_precision!r}: supported values are {DOT_PRECISIONS}")


def check_launch(**params: int) -> None:
    """Block sizes are powers of two (tl.arange); tl.dot needs at least 16 along its reduction."""
    for name, value in params.items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def code_view(pool: PackedVectors, spec: RecordSpec) -> torch.Tensor:
    """The code rows as the kernels read them: uint8, or the bf16 vectors of a raw layout."""
    return pool.codes.view(torch.bfloat16) if spec.seg0.kind == RAW.value else pool.codes


@dataclass(frozen=True)
class AttentionLaunch:
    """What decode and extend launchers share once the inputs are checked."""

    device: torch.device
    group: int  # query heads per KV head
    q_tiles: torch.Tensor  # (rows, q_heads, K.width) float32: sm_scale * R q (and the scaled S R q) in tile order
    k_spec: RecordSpec
    v_spec: RecordSpec
    k_tensors: KernelTensors
    v_tensors: KernelTensors
    k_codes: torch.Tensor
    v_codes: torch.Tensor


def prepare_attention(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    *,
    dot_precision: str,
    check_indices: bool,
) -> AttentionLaunch:
    """Check what decode and extend share (raising before any kernel can read out of bounds), rotate the query."""
    k_lay, v_lay = k_quantizer.layout, v_quantizer.layout
    if k_lay.head_dim != v_lay.head_dim:
        raise ValueError(f"K and V quantizers disagree on head_dim: {k_lay.head_dim} vs {v_lay.head_dim}")
    k_spec, v_spec = record_spec(k_lay), record_spec(v_lay)
    check_pool("k_pool", k_pool, k_lay)
    check_pool("v_pool", v_pool, v_lay, k_pool.codes.shape[1])
    if q.dim() != 3 or q.shape[-1] != k_lay.head_dim:
        raise ValueError(f"q must be (rows, q_heads, {k_lay.head_dim}), got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[1] % k_pool.codes.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of the pool's KV heads ({k_pool.codes.shape[1]})"
        )
    check_index_tensor("kv_indptr", kv_indptr)
    check_index_tensor("kv_indices", kv_indices)
    device = check_same_device(
        q=q, k_codes=k_pool.codes, v_codes=v_pool.codes, kv_indptr=kv_indptr, kv_indices=kv_indices
    )
    check_precision(dot_precision)
    if kv_indptr.numel() < 1:
        raise ValueError("kv_indptr must have batch + 1 entries, got an empty tensor")
    if check_indices:
        check_kv_indptr(kv_indptr, kv_indices, min(k_pool.codes.shape[0], v_pool.codes.shape[0]))
    kt, vt = kernel_tensors(k_quantizer, device), kernel_tensors(v_quantizer, device)
    q_rot, q_qjl = k_quantizer.rotate_query(q)
    tiles = [to_tiles(q_rot * sm_scale, kt.columns)]
    if q_qjl is not None:
        tiles.append(to_tiles(q_qjl * (sm_scale * k_quantizer.qjl_scale), kt.sign_columns))
    return AttentionLaunch(
        device=device,
        group=q.shape[1] // k_pool.codes.shape[1],
        q_tiles=torch.cat(tiles, dim=-1).contiguous(),
        k_spec=k_spec,
        v_spec=v_spec,
        k_tensors=kt,
        v_tensors=vt,
        k_codes=code_view(k_pool, k_spec),
        v_codes=code_view(v_pool, v_spec),
    )


def unrotate(out: torch.Tensor, v_quantizer: TurboQuantizer, dtype: torch.dtype) -> torch.Tensor:
    """Rotated-domain output (rows, heads, V.width) float32 in V's tile order -> original domain in `dtype`."""
    d = v_quantizer.layout.head_dim
    vt = kernel_tensors(v_quantizer, out.device)
    n = vt.columns.width
    acc = from_tiles(out[..., :n], vt.columns, d)
    acc_qjl = from_tiles(out[..., n:], vt.sign_columns, d) * v_quantizer.qjl_scale if vt.sign_columns.width else None
    return v_quantizer.unrotate_output(acc, acc_qjl).to(dtype)
