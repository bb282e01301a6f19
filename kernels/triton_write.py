"""Fused packed K/V write: norm, rotation, nearest centroid, bit packing and the scatter into pool slots, for K and
V of one layer in one launch. Semantics: reference.write_kv (TurboQuant Algorithms 1 and 2; layout.py for bytes).

Per row (one token, one KV head) of head_dim d:

    n = ||x||,  y = R (x / n)                   tl.dot of the row block with R^T, chunked over d (BLOCK_K)
    idx_j = #{boundaries < y_j}                 = torch.bucketize(right=False): a tie takes the lower code
    planes, shifts and masks                    pack_plane in tile order (triton_common), stored as uint8
    prod: r = y - c[idx], sign(S r) >= 0 -> 1, gamma = ||r||
    norm (or n / ||c[idx]|| with norm correction), gamma: into the pool's norm array (float16 or float32)

The rotation is computed in the tile order of each segment (columns gathered from R^T), so codes come out in the
order their planes are packed in and no register ever moves across columns except through the plane reshape.
Codes match the reference bit for bit except where y_j lies within rounding of a boundary: the two sums of d products
(torch's matmul, this tl.dot) can round differently, which moves such a code by one level (tests bound the fraction).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedVectors
from .quantizer import TurboQuantizer
from .triton_common import (
    FLOAT_DTYPES,
    check_index_tensor,
    check_launch,
    check_pool,
    check_precision,
    check_same_device,
    check_slots,
    kernel_tensors,
    pack_plane,
    record_tiles,
    tile_channels,
)

__all__ = ["write_kv_triton"]

_QJL_CHUNK = 64  # QJL projection columns per tl.dot: keeps S's tile at (width, 64) float32 for head_dim 256


@triton.jit
def _load_rows(x_row, row_mask, k0, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
    return tl.load(x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32), cols


@triton.jit
def _quantize_segment(
    x_row,
    rec,
    row_mask,
    norm,
    rot_ptr,
    cb_ptr,
    bnd_ptr,
    SEG: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    START: tl.constexpr,
    U: tl.constexpr,
    UP: tl.constexpr,
    PIECES: tl.constexpr,
    BITS: tl.constexpr,
    A_OFF: tl.constexpr,
    A_BITS: tl.constexpr,
    B_OFF: tl.constexpr,
):
    """Codes of one segment stored into its planes; returns (sum of c^2 (rows,), residual y - c (rows, W))."""
    chan, valid = tile_channels(START, U, UP, PIECES)
    y = tl.zeros([BLOCK_M, PIECES * UP], dtype=tl.float32)
    for k0 in range(0, D_PAD, BLOCK_K):
        x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
        u = x / norm[:, None]
        # rt[i, p] = R[chan(p), k0 + i]: y[p] = sum_i u_i R[chan(p), i], i.e. y = R u in tile order.
        rt_mask = (cols < HEAD_DIM)[:, None] & valid[None, :]
        rt = tl.load(rot_ptr + chan[None, :] * HEAD_DIM + cols[:, None], mask=rt_mask, other=0.0)
        y += tl.dot(u, rt, input_precision=PRECISION)
    codes = tl.zeros([BLOCK_M, PIECES * UP], dtype=tl.int32)
    for i in tl.static_range((1 << BITS) - 1):
        codes += (y > tl.load(bnd_ptr + SEG * 16 + i)).to(tl.int32)

    M_A: tl.constexpr = A_BITS * PIECES // 8
    q = tl.arange(0, M_A * UP)
    a_bytes = pack_plane(codes & ((1 << A_BITS) - 1), BLOCK_M, A_BITS, PIECES, UP)
    a_mask = row_mask[:, None] & ((q % UP) < U)[None, :]
    tl.store(rec[:, None] + (A_OFF + (q // UP) * U + q % UP)[None, :], a_bytes.to(tl.uint8), mask=a_mask)
    if BITS > A_BITS:
        j = tl.arange(0, UP)
        b_bytes = pack_plane((codes >> A_BITS) & 1, BLOCK_M, 1, PIECES, UP)
        tl.store(rec[:, None] + (B_OFF + j)[None, :], b_bytes.to(tl.uint8), mask=row_mask[:, None] & (j < U)[None, :])

    seg_mask = row_mask[:, None] & valid[None, :]
    c = tl.load(cb_ptr + SEG * 16 + codes, mask=seg_mask, other=0.0)
    return tl.sum(c * c, axis=1), tl.where(seg_mask, y - c, 0.0)


@triton.jit
def _store_qjl(
    rec,
    row_mask,
    residual,
    qjl_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
    QJL_OFF: tl.constexpr,
    U8: tl.constexpr,
    UP8: tl.constexpr,
    U: tl.constexpr,
    UP: tl.constexpr,
    PIECES: tl.constexpr,
):
    """prod: bits sign(S r) >= 0 of the residual (tile order of the single segment) into the QJL plane."""
    chan, valid = tile_channels(0, U, UP, PIECES)
    PER_CHUNK: tl.constexpr = QJL_CHUNK // UP8
    qbytes = tl.zeros([BLOCK_M, UP8], dtype=tl.int32)
    for c0 in range(0, 8 * UP8, QJL_CHUNK):
        cc = c0 + tl.arange(0, QJL_CHUNK)
        out_chan = (cc // UP8) * U8 + cc % UP8
        # st[p, o] = S[out_chan(o), chan(p)]: proj[o] = sum_p r_p S[out_chan(o), chan(p)] = (S r)[out_chan(o)].
        st_mask = valid[:, None] & ((cc % UP8) < U8)[None, :]
        st = tl.load(qjl_ptr + out_chan[None, :] * HEAD_DIM + chan[:, None], mask=st_mask, other=0.0)
        proj = tl.dot(residual, st, input_precision=PRECISION)
        bits = tl.reshape((proj >= 0).to(tl.int32), (BLOCK_M, PER_CHUNK, UP8))
        shifts = (c0 // UP8 + tl.arange(0, PER_CHUNK))[None, :, None]
        qbytes |= tl.sum(bits << shifts, axis=1)
    j = tl.arange(0, UP8)
    tl.store(rec[:, None] + (QJL_OFF + j)[None, :], qbytes.to(tl.uint8), mask=row_mask[:, None] & (j < U8)[None, :])


@triton.jit
def _quantize_store(
    x_row,
    rec,
    nrm,
    row_mask,
    rot_ptr,
    qjl_ptr,
    cb_ptr,
    bnd_ptr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
    NORM_CORRECTION: tl.constexpr,
    RAW: tl.constexpr,
    NSEG: tl.constexpr,
    PROD: tl.constexpr,
    QJL_OFF: tl.constexpr,
    U8: tl.constexpr,
    UP8: tl.constexpr,
    S0_START: tl.constexpr,
    S0_U: tl.constexpr,
    S0_UP: tl.constexpr,
    S0_PIECES: tl.constexpr,
    S0_BITS: tl.constexpr,
    S0_A_OFF: tl.constexpr,
    S0_A_BITS: tl.constexpr,
    S0_B_OFF: tl.constexpr,
    S1_START: tl.constexpr,
    S1_U: tl.constexpr,
    S1_UP: tl.constexpr,
    S1_PIECES: tl.constexpr,
    S1_BITS: tl.constexpr,
    S1_A_OFF: tl.constexpr,
    S1_A_BITS: tl.constexpr,
    S1_B_OFF: tl.constexpr,
):
    """Quantize the rows x_row (BLOCK_M,) of one of K/V; store their code rows at rec (BLOCK_M,) and their norms at
    nrm (BLOCK_M,) (typed pointers into the pool's norm array: n, then gamma for prod)."""
    if RAW:
        for k0 in range(0, D_PAD, BLOCK_K):
            x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
            # float32 -> bfloat16 round to nearest even by hand, as torch does: Triton's interpreter truncates.
            x_bits = x.to(tl.uint32, bitcast=True)
            bits = (x_bits + 0x7FFF + ((x_bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, 0x7FC0, bits)
            mask = row_mask[:, None] & (cols < HEAD_DIM)[None, :]
            tl.store(rec[:, None] + 2 * cols[None, :], (bits & 255).to(tl.uint8), mask=mask)
            tl.store(rec[:, None] + 2 * cols[None, :] + 1, (bits >> 8).to(tl.uint8), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, D_PAD, BLOCK_K):
            x, cols = _load_rows(x_row, row_mask, k0, HEAD_DIM, BLOCK_K)
            sum_sq += tl.sum(x * x, axis=1)
        norm = tl.sqrt(sum_sq)
        safe_norm = tl.maximum(norm, 1e-30)
        c_sq, residual = _quantize_segment(
            x_row, rec, row_mask, safe_norm, rot_ptr, cb_ptr, bnd_ptr, 0, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K,
            PRECISION, S0_START, S0_U, S0_UP, S0_PIECES, S0_BITS, S0_A_OFF, S0_A_BITS, S0_B_OFF,
        )  # fmt: skip
        if NSEG == 2:
            c_sq1, _ = _quantize_segment(
                x_row, rec, row_mask, safe_norm, rot_ptr, cb_ptr, bnd_ptr, 1, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K,
                PRECISION, S1_START, S1_U, S1_UP, S1_PIECES, S1_BITS, S1_A_OFF, S1_A_BITS, S1_B_OFF,
            )  # fmt: skip
            c_sq += c_sq1
        if NORM_CORRECTION:
            norm = norm / tl.maximum(tl.sqrt(c_sq), 1e-30)
        tl.store(nrm, norm.to(nrm.dtype.element_ty), mask=row_mask)
        if PROD:
            _store_qjl(
                rec, row_mask, residual, qjl_ptr, HEAD_DIM, BLOCK_M, PRECISION, QJL_CHUNK, QJL_OFF, U8, UP8,
                S0_U, S0_UP, S0_PIECES,
            )  # fmt: skip
            gamma = tl.sqrt(tl.sum(residual * residual, axis=1))
            tl.store(nrm + 1, gamma.to(nrm.dtype.element_ty), mask=row_mask)


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    loc_ptr,
    k_pool_ptr,
    v_pool_ptr,
    k_norm_ptr,
    v_norm_ptr,
    k_rot_ptr,
    k_qjl_ptr,
    k_cb_ptr,
    k_bnd_ptr,
    v_rot_ptr,
    v_qjl_ptr,
    v_cb_ptr,
    v_bnd_ptr,
    num_rows,
    num_heads,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kp_s,
    stride_kp_h,
    stride_vp_s,
    stride_vp_h,
    stride_kn_s,
    stride_kn_h,
    stride_vn_s,
    stride_vn_h,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    QJL_CHUNK: tl.constexpr,
    K_NORM_CORRECTION: tl.constexpr,
    V_NORM_CORRECTION: tl.constexpr,
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
    """One program: BLOCK_M rows of the flattened (token, kv_head) grid, K then V."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    tok = (rows // num_heads).to(tl.int64)
    head = (rows % num_heads).to(tl.int64)
    slot = tl.load(loc_ptr + tok, mask=row_mask, other=0).to(tl.int64)
    _quantize_store(
        k_ptr + tok * stride_k_t + head * stride_k_h, k_pool_ptr + slot * stride_kp_s + head * stride_kp_h,
        k_norm_ptr + slot * stride_kn_s + head * stride_kn_h, row_mask,
        k_rot_ptr, k_qjl_ptr, k_cb_ptr, k_bnd_ptr, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K, PRECISION, QJL_CHUNK,
        K_NORM_CORRECTION, K_RAW, K_NSEG, K_PROD, K_QJL_OFF, K_U8, K_UP8,
        K_S0_START, K_S0_U, K_S0_UP, K_S0_PIECES, K_S0_BITS, K_S0_A_OFF, K_S0_A_BITS, K_S0_B_OFF,
        K_S1_START, K_S1_U, K_S1_UP, K_S1_PIECES, K_S1_BITS, K_S1_A_OFF, K_S1_A_BITS, K_S1_B_OFF,
    )  # fmt: skip
    _quantize_store(
        v_ptr + tok * stride_v_t + head * stride_v_h, v_pool_ptr + slot * stride_vp_s + head * stride_vp_h,
        v_norm_ptr + slot * stride_vn_s + head * stride_vn_h, row_mask,
        v_rot_ptr, v_qjl_ptr, v_cb_ptr, v_bnd_ptr, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_K, PRECISION, QJL_CHUNK,
        V_NORM_CORRECTION, V_RAW, V_NSEG, V_PROD, V_QJL_OFF, V_U8, V_UP8,
        V_S0_START, V_S0_U, V_S0_UP, V_S0_PIECES, V_S0_BITS, V_S0_A_OFF, V_S0_A_BITS, V_S0_B_OFF,
        V_S1_START, V_S1_U, V_S1_UP, V_S1_PIECES, V_S1_BITS, V_S1_A_OFF, V_S1_A_BITS, V_S1_B_OFF,
    )  # fmt: skip


def _check_vectors(k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int, tokens: int) -> None:
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape) != (tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be (tokens, kv_heads, head_dim) = ({tokens}, {num_kv_heads}, {head_dim}) with tokens = "
                f"len(out_cache_loc), got {tuple(x.shape)}"
            )
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {x.dtype}")
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
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 1,
    dot_precision: str = "ieee",
    check_indices: bool = True,
) -> None:
    """Quantize k, v (tokens, kv_heads, head_dim) and store them at pool slots out_cache_loc (tokens,), in place.

    Same semantics as reference.write_kv. dot_precision "ieee" keeps the rotation an exact float32 sum (tf32 would
    move many codes across boundaries). check_indices=False skips the range check of out_cache_loc (a device sync),
    e.g. under CUDA-graph capture; the caller then guarantees the slots are in range.
    """
    k_lay, v_lay = k_quantizer.layout, v_quantizer.layout
    if k_lay.head_dim != v_lay.head_dim:
        raise ValueError(f"K and V quantizers disagree on head_dim: {k_lay.head_dim} vs {v_lay.head_dim}")
    k_tiles, v_tiles = record_tiles(k_lay), record_tiles(v_lay)
    check_pool("k_pool", k_pool, k_lay)
    check_pool("v_pool", v_pool, v_lay, k_pool.shape[1])
    check_index_tensor("out_cache_loc", out_cache_loc)
    _check_vectors(k, v, k_pool.shape[1], k_lay.head_dim, out_cache_loc.numel())
    device = check_same_device(
        k_codes=k_pool.codes,
        k_norms=k_pool.norms,
        v_codes=v_pool.codes,
        v_norms=v_pool.norms,
        k=k,
        v=v,
        out_cache_loc=out_cache_loc,
    )
    check_precision(dot_precision)
    check_launch(block_m=block_m, block_k=block_k)
    if check_indices:
        check_slots("out_cache_loc", out_cache_loc, min(k_pool.shape[0], v_pool.shape[0]))
    num_rows = k.shape[0] * k.shape[1]
    if num_rows == 0:
        return
    d_pad = triton.next_power_of_2(k_lay.head_dim)
    kt, vt = kernel_tensors(k_quantizer, device), kernel_tensors(v_quantizer, device)
    _write_kv_kernel[(triton.cdiv(num_rows, block_m),)](
        k, v, out_cache_loc, k_pool.codes, v_pool.codes, k_pool.norms, v_pool.norms,
        kt.rotation, kt.qjl, kt.codebook, kt.boundaries, vt.rotation, vt.qjl, vt.codebook, vt.boundaries,
        num_rows, k.shape[1], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.codes.stride(0), k_pool.codes.stride(1), v_pool.codes.stride(0), v_pool.codes.stride(1),
        k_pool.norms.stride(0), k_pool.norms.stride(1), v_pool.norms.stride(0), v_pool.norms.stride(1),
        HEAD_DIM=k_lay.head_dim,
        D_PAD=d_pad,
        BLOCK_M=block_m,
        BLOCK_K=min(block_k, d_pad),
        PRECISION=dot_precision,
        QJL_CHUNK=_QJL_CHUNK,
        K_NORM_CORRECTION=k_quantizer.norm_correction,
        V_NORM_CORRECTION=v_quantizer.norm_correction,
        **k_tiles.constexprs("K"),
        **v_tiles.constexprs("V"),
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
