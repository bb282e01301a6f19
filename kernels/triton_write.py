"""Fused packed K/V write: norm, rotation, nearest centroid, bit packing and the scatter into pool slots, for K and
V of one layer in one launch. Semantics: reference.write_kv (TurboQuant Algorithms 1 and 2; layout.py for bytes).

Per row (one token, one KV head) of head_dim d:

    s = 2^-e (e: exponent of max |x_j|)         exact power-of-two scale (quantizer.power_of_two_scale, same bits)
    n = ||s x|| / s,  y = R (s x / ||s x||)     tl.dot of the row block with R^T, chunked over d (BLOCK_K)
    idx_j = #{boundaries < y_j}                 = torch.bucketize(right=False): a tie takes the lower code
    planes, shifts and masks                    each plane packed in registers and stored as one contiguous run of
                                                its code row (a 4-bit or 2-bit row: the whole row in one store)
    prod: r = y - c[idx], sign(S r) >= 0 -> 1, gamma = ||r||
    norms: n (or n / ||c[idx]|| with norm correction), gamma, stored into the pool's norm rows, n saturated at the
           norm dtype's largest finite value (never inf); with a counter, the saturated norms are added to it by
           one atomic per program (read lazily by the pool: no host sync)

The rotation is computed in the plane order of each segment (columns gathered from R^T): tile column piece * UP + j
is channel start + piece * U + j of the segment's finest plane (U bytes), so codes come out in the order their
planes are packed in. Codes match the reference bit for bit except where y_j lies within rounding of a boundary:
the two sums of d products (torch's matmul, this tl.dot) can round differently, which moves such a code by one
level. write_mismatch holds a write to that budget (tests, the autotuner and the GPU check use it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_checks import check_index_tensor, check_kv_vectors, check_pool, check_same_device, check_slots
from .layout import VectorLayout
from .packed import PackedVectors
from .quantizer import TurboQuantizer, norm_limit
from .triton_common import (
    check_launch,
    check_precision,
    code_view,
    kernel_tensors,
    record_spec,
)
from .write_budget import MAX_CODE_FLIPS, MAX_SIGN_FLIPS, write_mismatch

__all__ = ["write_kv_triton", "write_mismatch", "MAX_CODE_FLIPS", "MAX_SIGN_FLIPS"]

_QJL_CHUNK = 64  # QJL projection columns per tl.dot: keeps S's tile at (width, 64) float32 for head_dim 256


class WriteSegment(NamedTuple):
    """Plane geometry of one segment as the write packs it (module docstring): its finest plane has U bytes."""

    start: int = 0
    u: int = 1
    up: int = 1
    pieces: int = 8
    bits: int = 1
    a_off: int = 0  # the first (or only) plane
    a_bits: int = 1
    b_off: int = -1  # the 1-bit high plane of a 3-bit code, -1 when the segment has one plane


class WriteSpec(NamedTuple):
    """One VectorLayout as the write kernel needs it."""

    raw: int
    nseg: int
    prod: int
    seg0: WriteSegment
    seg1: WriteSegment
    qjl_off: int
    u8: int  # bytes of the QJL sign plane
    up8: int


def write_spec(layout: VectorLayout) -> WriteSpec:
    record_spec(layout)  # raises for layouts the kernels do not serve
    segs = []
    for seg in layout.segments:
        first, finest = seg.planes[0], seg.planes[-1]
        u = finest.nbytes
        b_off = seg.planes[1].offset if len(seg.planes) > 1 else -1
        segs.append(
            WriteSegment(
                seg.start, u, triton.next_power_of_2(u), finest.per_byte, seg.bits, first.offset, first.bits, b_off
            )
        )
    while len(segs) < 2:
        segs.append(WriteSegment())
    d = layout.head_dim
    return WriteSpec(
        int(layout.is_raw), len(layout.segments), int(layout.variant == "prod" and not layout.is_raw),
        segs[0], segs[1], layout.qjl_offset, d // 8, triton.next_power_of_2(d // 8),
    )  # fmt: skip


@triton.jit
def _tile_channels(SPEC: tl.constexpr, INDEX: tl.constexpr):
    """Channel of each tile column (PIECES * UP,) of segment INDEX and whether the column is a real channel. A segment
    is passed as (spec, index), not as a nested NamedTuple: Triton 3.6 does not take those as arguments."""
    if INDEX == 0:
        SEG: tl.constexpr = SPEC.seg0
    else:
        SEG: tl.constexpr = SPEC.seg1
    pos = tl.arange(0, SEG.pieces * SEG.up)
    j = pos % SEG.up
    return SEG.start + (pos // SEG.up) * SEG.u + j, j < SEG.u


@triton.jit
def _pack_plane(values, ROWS: tl.constexpr, BITS: tl.constexpr, PIECES: tl.constexpr, UP: tl.constexpr):
    """Plane values (rows, PIECES * UP) int32 < 2**BITS in tile order -> the plane's bytes (rows, M * UP) int32,
    M = BITS * PIECES / 8: column h * UP + j of the result is byte h * U + j of the plane."""
    M: tl.constexpr = BITS * PIECES // 8
    PER_BYTE: tl.constexpr = 8 // BITS
    shifts = (tl.arange(0, PER_BYTE) * BITS)[None, :, None, None]
    blocks = tl.reshape(values, (ROWS, PER_BYTE, M, UP))
    # The shifted values occupy disjoint bits, so the sum is the bitwise or.
    return tl.reshape(tl.sum(blocks << shifts, axis=1), (ROWS, M * UP))


@triton.jit
def _load_rows(x_row, row_mask, k0, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32), cols


@triton.jit
def _quantize_segment(
    x_row,
    code_row,
    row_mask,
    norm,
    scale,
    rot_ptr,
    cb_ptr,
    bnd_ptr,
    SPEC: tl.constexpr,
    SEG_INDEX: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Codes of one segment stored into its planes; returns (sum of c^2 (rows,), residual y - c (rows, W))."""
    if SEG_INDEX == 0:
        SEG: tl.constexpr = SPEC.seg0
    else:
        SEG: tl.constexpr = SPEC.seg1
    chan, valid = _tile_channels(SPEC, SEG_INDEX)
    y = tl.zeros([BLOCK_M, SEG.pieces * SEG.up], dtype=tl.float32)
    for k0 in range(0, D_PAD, BLOCK_K):
        x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
        u = (x * scale[:, None]) / norm[:, None]
        # rt[i, p] = R[chan(p), k0 + i]: y[p] = sum_i u_i R[chan(p), i], i.e. y = R u in tile order.
        rt_mask = (cols < HEAD_DIM)[:, None] & valid[None, :]
        rt = tl.load(rot_ptr + chan[None, :] * HEAD_DIM + cols[:, None], mask=rt_mask, other=0.0)
        y += tl.dot(u, rt, input_precision=PRECISION)
    codes = tl.zeros([BLOCK_M, SEG.pieces * SEG.up], dtype=tl.int32)
    for i in tl.static_range((1 << SEG.bits) - 1):
        codes += (y > tl.load(bnd_ptr + SEG_INDEX * 16 + i)).to(tl.int32)

    M_A: tl.constexpr = SEG.a_bits * SEG.pieces // 8
    q = tl.arange(0, M_A * SEG.up)
    a_bytes = _pack_plane(codes & ((1 << SEG.a_bits) - 1), BLOCK_M, SEG.a_bits, SEG.pieces, SEG.up)
    a_mask = row_mask[:, None] & ((q % SEG.up) < SEG.u)[None, :]
    a_cols = SEG.a_off + (q // SEG.up) * SEG.u + q % SEG.up
    tl.store(code_row[:, None] + a_cols[None, :], a_bytes.to(tl.uint8), mask=a_mask)
    if SEG.bits > SEG.a_bits:
        j = tl.arange(0, SEG.up)
        b_bytes = _pack_plane((codes >> SEG.a_bits) & 1, BLOCK_M, 1, SEG.pieces, SEG.up)
        b_mask = row_mask[:, None] & (j < SEG.u)[None, :]
        tl.store(code_row[:, None] + (SEG.b_off + j)[None, :], b_bytes.to(tl.uint8), mask=b_mask)

    seg_mask = row_mask[:, None] & valid[None, :]
    c = tl.load(cb_ptr + SEG_INDEX * 16 + codes, mask=seg_mask, other=0.0)
    return tl.sum(c * c, axis=1), tl.where(seg_mask, y - c, 0.0)


@triton.jit
def _store_qjl(
    code_row,
    row_mask,
    residual,
    qjl_ptr,
    SPEC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
):
    """prod: bits sign(S r) >= 0 of the residual (tile order of the single segment) into the QJL plane."""
    chan, valid = _tile_channels(SPEC, 0)
    UP8: tl.constexpr = SPEC.up8
    PER_CHUNK: tl.constexpr = QJL_CHUNK // UP8
    qbytes = tl.zeros([BLOCK_M, UP8], dtype=tl.int32)
    for c0 in range(0, 8 * UP8, QJL_CHUNK):
        cc = c0 + tl.arange(0, QJL_CHUNK)
        out_chan = (cc // UP8) * SPEC.u8 + cc % UP8
        # st[p, o] = S[out_chan(o), chan(p)]: proj[o] = sum_p r_p S[out_chan(o), chan(p)] = (S r)[out_chan(o)].
        st_mask = valid[:, None] & ((cc % UP8) < SPEC.u8)[None, :]
        st = tl.load(qjl_ptr + out_chan[None, :] * HEAD_DIM + chan[:, None], mask=st_mask, other=0.0)
        proj = tl.dot(residual, st, input_precision=PRECISION)
        bits = tl.reshape((proj >= 0).to(tl.int32), (BLOCK_M, PER_CHUNK, UP8))
        shifts = (c0 // UP8 + tl.arange(0, PER_CHUNK))[None, :, None]
        qbytes |= tl.sum(bits << shifts, axis=1)
    j = tl.arange(0, UP8)
    mask = row_mask[:, None] & (j < SPEC.u8)[None, :]
    tl.store(code_row[:, None] + (SPEC.qjl_off + j)[None, :], qbytes.to(tl.uint8), mask=mask)


@triton.jit
def _quantize_store(
    x_row,
    code_row,
    norm_row,
    row_mask,
    rot_ptr,
    qjl_ptr,
    cb_ptr,
    bnd_ptr,
    SPEC: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
    sat_ptr,
    NORM_MAX: tl.constexpr,
    COUNT: tl.constexpr,
):
    """Quantize the rows x_row (BLOCK_M,) of one of K/V; store code rows at code_row and norms at norm_row (saturated
    at NORM_MAX; with COUNT, their number added to sat_ptr[0])."""
    if SPEC.raw:
        for k0 in range(0, D_PAD, BLOCK_K):
            x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
            # float32 -> bfloat16 round to nearest even by hand, as torch does: Triton's interpreter truncates.
            x_bits = x.to(tl.uint32, bitcast=True)
            bits = (x_bits + 0x7FFF + ((x_bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, 0x7FC0, bits)
            mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
            tl.store(code_row[:, None] + cols[None, :], bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D_PAD, BLOCK_K):
            x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        # 2^-e, e the exponent of max |x_j| clamped to [-126, 126]: an exact scale under which the squares of huge
        # (bf16 near its max) and denormal inputs stay in float32 range (quantizer.power_of_two_scale)
        exponent = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        exponent = tl.minimum(tl.maximum(exponent, -126), 126)
        scale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D_PAD, BLOCK_K):
            x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
            xs = x * scale[:, None]
            sum_sq += tl.sum(xs * xs, axis=1)
        norm_s = tl.sqrt(sum_sq)
        safe_norm = tl.maximum(norm_s, 1e-30)
        c_sq, residual = _quantize_segment(
            x_row, code_row, row_mask, safe_norm, scale, rot_ptr, cb_ptr, bnd_ptr, SPEC, 0, HEAD_DIM, D_PAD,
            BLOCK_M, BLOCK_K, PRECISION,
        )  # fmt: skip
        if SPEC.nseg == 2:
            c_sq1, _ = _quantize_segment(
                x_row, code_row, row_mask, safe_norm, scale, rot_ptr, cb_ptr, bnd_ptr, SPEC, 1, HEAD_DIM, D_PAD,
                BLOCK_M, BLOCK_K, PRECISION,
            )  # fmt: skip
            c_sq += c_sq1
        norm = norm_s / scale  # inf beyond float32: saturated below
        if NORM_CORRECTION:
            norm = norm / tl.maximum(tl.sqrt(c_sq), 1e-30)
        if COUNT:
            over = tl.sum(((norm > NORM_MAX) & row_mask).to(tl.int64), axis=0)
            tl.atomic_add(sat_ptr, over, mask=over > 0)
        norm = tl.minimum(norm, NORM_MAX)
        tl.store(norm_row, norm.to(norm_row.dtype.element_ty), mask=row_mask)
        if SPEC.prod:
            _store_qjl(code_row, row_mask, residual, qjl_ptr, SPEC, HEAD_DIM, BLOCK_M, PRECISION, QJL_CHUNK)
            gamma = tl.sqrt(tl.sum(residual * residual, axis=1))
            tl.store(norm_row + 1, gamma.to(norm_row.dtype.element_ty), mask=row_mask)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    loc_ptr,
    k_codes_ptr,
    k_norms_ptr,
    v_codes_ptr,
    v_norms_ptr,
    k_rot_ptr,
    k_qjl_ptr,
    k_cb_ptr,
    k_bnd_ptr,
    v_rot_ptr,
    v_qjl_ptr,
    v_cb_ptr,
    v_bnd_ptr,
    sat_ptr,
    num_rows,
    num_heads,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    K: tl.constexpr,
    V: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
    K_NORM_CORRECTION: tl.constexpr,
    V_NORM_CORRECTION: tl.constexpr,
    K_NORM_MAX: tl.constexpr,
    V_NORM_MAX: tl.constexpr,
    COUNT: tl.constexpr,
):
    """One program: BLOCK_M rows of the flattened (token, kv_head) grid, K then V."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    tok = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    slot = tl.load(loc_ptr + tok, mask=row_mask, other=0).to(tl.int64)
    _quantize_store(
        k_ptr + tok * stride_k_t + head * stride_k_h, k_codes_ptr + slot * stride_kc_s + head * stride_kc_h,
        k_norms_ptr + slot * stride_kn_s + head * stride_kn_h, row_mask, k_rot_ptr, k_qjl_ptr, k_cb_ptr, k_bnd_ptr,
        K, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K, PRECISION, QJL_CHUNK, K_NORM_CORRECTION, sat_ptr, K_NORM_MAX, COUNT,
    )  # fmt: skip
    _quantize_store(
        v_ptr + tok * stride_v_t + head * stride_v_h, v_codes_ptr + slot * stride_vc_s + head * stride_vc_h,
        v_norms_ptr + slot * stride_vn_s + head * stride_vn_h, row_mask, v_rot_ptr, v_qjl_ptr, v_cb_ptr, v_bnd_ptr,
        V, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K, PRECISION, QJL_CHUNK, V_NORM_CORRECTION, sat_ptr, V_NORM_MAX, COUNT,
    )  # fmt: skip


def _check_vectors(k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int, tokens: int) -> None:
    check_kv_vectors(k, v, num_kv_heads, head_dim, tokens)
    for name, x in (("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name}: head_dim must be contiguous, got strides {x.stride()}")


def write_kv_triton(
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    k: torch.Tensor,
    v: torch.Tensor,
    out_cache_loc: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    *,
    block_m: int = 16,
    block_k: int = 16,
    num_warps: int = 4,
    num_stages: int = 1,
    dot_precision: str = "ieee",
    check_indices: bool = True,
    saturated: torch.Tensor | None = None,
) -> None:
    """Quantize k, v (tokens, kv_heads, head_dim) and store them at pool slots out_cache_loc (tokens,), in place.

    Same semantics as reference.write_kv, saturated norms included (`saturated`: an int64 tensor on the pool's
    device whose first element counts them, by atomics: no host sync). dot_precision "ieee" keeps the rotation an
    exact float32 sum ("tf32" would move many codes across boundaries; "tf32x3" stays within the flip budget on
    tensor cores). check_indices=False skips the range check of out_cache_loc (a device sync), e.g. under CUDA-graph
    capture; the caller then guarantees the slots are in range.
    """
    k_lay, v_lay = k_quantizer.layout, v_quantizer.layout
    if k_lay.head_dim != v_lay.head_dim:
        raise ValueError(f"K and V quantizers disagree on head_dim: {k_lay.head_dim} vs {v_lay.head_dim}")
    k_spec, v_spec = write_spec(k_lay), write_spec(v_lay)
    check_pool("k_pool", k_pool, k_lay)
    check_pool("v_pool", v_pool, v_lay, k_pool.codes.shape[1])
    check_index_tensor("out_cache_loc", out_cache_loc)
    _check_vectors(k, v, k_pool.codes.shape[1], k_lay.head_dim, out_cache_loc.numel())
    device = check_same_device(k_pool=k_pool.codes, v_pool=v_pool.codes, k=k, v=v, out_cache_loc=out_cache_loc)
    check_precision(dot_precision)
    if dot_precision == "bf16":
        raise ValueError("dot_precision 'bf16' would move most codes: the write takes 'ieee', 'tf32x3' or 'tf32'")
    check_launch(block_m=block_m, block_k=block_k)
    if check_indices:
        check_slots("out_cache_loc", out_cache_loc, min(k_pool.codes.shape[0], v_pool.codes.shape[0]))
    num_rows = k.shape[0] * k.shape[1]
    if num_rows == 0:
        return
    d_pad = triton.next_power_of_2(k_lay.head_dim)
    kt, vt = kernel_tensors(k_quantizer, device), kernel_tensors(v_quantizer, device)
    kc, vc = code_view(k_pool, record_spec(k_lay)), code_view(v_pool, record_spec(v_lay))
    kn, vn = k_pool.norms, v_pool.norms
    _write_kv_kernel[(triton.cdiv(num_rows, block_m),)](
        k, v, out_cache_loc, kc, kn, vc, vn,
        kt.rotation, kt.qjl, kt.codebook, kt.boundaries, vt.rotation, vt.qjl, vt.codebook, vt.boundaries,
        out_cache_loc if saturated is None else saturated,
        num_rows, k.shape[1], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kn.stride(0), kn.stride(1), vc.stride(0), vc.stride(1), vn.stride(0), vn.stride(1),
        K=k_spec,
        V=v_spec,
        HEAD_DIM=k_lay.head_dim,
        D_PAD=d_pad,
        BLOCK_M=block_m,
        BLOCK_K=min(block_k, d_pad),
        PRECISION=dot_precision,
        QJL_CHUNK=_QJL_CHUNK,
        K_NORM_CORRECTION=k_quantizer.norm_correction,
        V_NORM_CORRECTION=v_quantizer.norm_correction,
        K_NORM_MAX=norm_limit(k_quantizer.norm_dtype),
        V_NORM_MAX=norm_limit(v_quantizer.norm_dtype),
        COUNT=saturated is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
