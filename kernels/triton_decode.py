"""Fused decode attention on the packed KV pool: one new token per request, split-K over long contexts.

Semantics: reference.decode_attention (rotated domain, DESIGN.md section 3). The launcher rotates the query once
(q_rot = R q, and sqrt(pi/2)/d * S R q for a prod K); the split kernel reads each request's slots, unpacks codes to
centroids in registers and runs an online softmax; the reduce kernel merges the splits by their log-sum-exp; the
launcher rotates the merged output back once ((acc + sqrt(pi/2)/d * acc_qjl S) R). Nothing dequantized is ever
written to memory.

    grid (batch, kv_heads, num_kv_splits): one program reads a BLOCK_N tile of packed K/V once for all
    GROUP = q_heads / kv_heads query heads (padded to BLOCK_H >= 16 rows for tl.dot), over its share of the context

Bytes moved per token and KV head (head_dim 128, float16 norms), K + V, against a bf16 cache:

    bf16 512 B  |  4 bits 132 B (3.9x less)  |  3 bits 100 B (5.1x)  |  2 bits 68 B (7.5x)  |  prod adds nothing
    (its b-1 bit codes + signs + 2nd norm = b bits); plus the slot index (4 or 8 B, as for any paged cache)

Decode is memory-bound at long context, so the target is these bytes at close to HBM bandwidth; the unpack (a
shift, a mask, one L1 codebook load per element) and the two tl.dot per tile must hide behind the loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedVectors
from .quantizer import TurboQuantizer
from .triton_common import (
    attend_tile,
    check_launch,
    load_query,
    prepare_attention,
    store_rows,
    unrotate,
)

__all__ = ["decode_attention_triton", "default_num_kv_splits"]


@triton.jit
def _decode_split_kernel(
    q_ptr,
    qq_ptr,
    k_pool_ptr,
    v_pool_ptr,
    k_norm_ptr,
    v_norm_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    k_cb_ptr,
    v_cb_ptr,
    part_ptr,
    lse_ptr,
    sm_scale,
    logit_cap,
    num_splits,
    stride_q_b,
    stride_q_h,
    stride_kp_s,
    stride_kp_h,
    stride_vp_s,
    stride_vp_h,
    stride_kn_s,
    stride_kn_h,
    stride_vn_s,
    stride_vn_h,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    stride_lse_b,
    stride_lse_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    """Program (request b, KV head h, split s): partial softmax over the s-th share of request b's slots."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    kv_len = (tl.load(kv_indptr_ptr + b + 1) - kv_start).to(tl.int32)
    per_split = tl.cdiv(kv_len, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    g = tl.arange(0, BLOCK_H)
    h_mask = g < GROUP
    head = (h * GROUP + g).to(tl.int64)
    q_row = q_ptr + b.to(tl.int64) * stride_q_b + head * stride_q_h
    q0 = load_query(q_row, h_mask, K_S0_START, K_S0_U, K_S0_UP, K_S0_PIECES)
    q1 = tl.zeros([BLOCK_H, K_S1_PIECES * K_S1_UP], dtype=tl.float32)
    if K_NSEG == 2:
        q1 = load_query(q_row, h_mask, K_S1_START, K_S1_U, K_S1_UP, K_S1_PIECES)
    qq = tl.zeros([BLOCK_H, 8 * K_UP8], dtype=tl.float32)
    if K_PROD:
        qq = load_query(qq_ptr + b.to(tl.int64) * stride_q_b + head * stride_q_h, h_mask, 0, K_U8, K_UP8, 8)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, V_S0_PIECES * V_S0_UP], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, V_S1_PIECES * V_S1_UP], dtype=tl.float32)
    accq = tl.zeros([BLOCK_H, 8 * V_UP8], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < hi
        slot = tl.load(kv_indices_ptr + kv_start + offs, mask=n_mask, other=0).to(tl.int64)
        m_i, l_i, acc0, acc1, accq = attend_tile(
            q0, q1, qq, m_i, l_i, acc0, acc1, accq,
            k_pool_ptr + slot * stride_kp_s + h * stride_kp_h, v_pool_ptr + slot * stride_vp_s + h * stride_vp_h,
            k_norm_ptr + slot * stride_kn_s + h * stride_kn_h, v_norm_ptr + slot * stride_vn_s + h * stride_vn_h,
            n_mask, n_mask[None, :], k_cb_ptr, v_cb_ptr, sm_scale, logit_cap, HAS_CAP, PRECISION,
            K_RAW, K_NSEG, K_PROD, K_QJL_OFF, K_U8, K_UP8, K_S0_START, K_S0_U,
            K_S0_UP, K_S0_PIECES, K_S0_BITS, K_S0_A_OFF, K_S0_A_BITS, K_S0_B_OFF, K_S1_START, K_S1_U, K_S1_UP,
            K_S1_PIECES, K_S1_BITS, K_S1_A_OFF, K_S1_A_BITS, K_S1_B_OFF, V_RAW, V_NSEG, V_PROD,
            V_QJL_OFF, V_U8, V_UP8, V_S0_START, V_S0_U, V_S0_UP, V_S0_PIECES, V_S0_BITS,
            V_S0_A_OFF, V_S0_A_BITS, V_S0_B_OFF, V_S1_START, V_S1_U, V_S1_UP, V_S1_PIECES, V_S1_BITS, V_S1_A_OFF,
            V_S1_A_BITS, V_S1_B_OFF
        )  # fmt: skip

    # An empty split (short request) leaves l_i = 0: it stores lse = -inf, which the reduce skips.
    has_keys = l_i > 0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    part_row = part_ptr + b.to(tl.int64) * stride_part_b + head * stride_part_h + split * stride_part_s
    store_rows(part_row, h_mask, acc0 * inv_l[:, None], V_S0_START, V_S0_U, V_S0_UP, V_S0_PIECES)
    if V_NSEG == 2:
        store_rows(part_row, h_mask, acc1 * inv_l[:, None], V_S1_START, V_S1_U, V_S1_UP, V_S1_PIECES)
    if V_PROD:
        store_rows(part_row + HEAD_DIM, h_mask, accq * inv_l[:, None], 0, V_U8, V_UP8, 8)
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b.to(tl.int64) * stride_lse_b + head * stride_lse_h + split, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    stride_lse_b,
    stride_lse_h,
    stride_out_b,
    stride_out_h,
    DV: tl.constexpr,
    DV_PAD: tl.constexpr,
):
    """Program (request b, query head): merge the splits' partial outputs by their log-sum-exp (rotated domain)."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, DV_PAD)
    mask = offs < DV
    e_max = float("-inf")
    e_sum = 0.0
    acc = tl.zeros([DV_PAD], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(lse_ptr + b * stride_lse_b + hq * stride_lse_h + s)
        if lse > float("-inf"):
            part = tl.load(part_ptr + b * stride_part_b + hq * stride_part_h + s * stride_part_s + offs, mask=mask)
            new_max = tl.maximum(e_max, lse)
            rescale = tl.exp(e_max - new_max)
            weight = tl.exp(lse - new_max)
            acc = acc * rescale + weight * part
            e_sum = e_sum * rescale + weight
            e_max = new_max
    out = acc / tl.where(e_sum > 0, e_sum, 1.0)
    tl.store(out_ptr + b * stride_out_b + hq * stride_out_h + offs, out, mask=mask)


def default_num_kv_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits that batch x kv_heads x splits programs fill the GPU about twice, at most 32 (the reduce reads
    every split). A rule, not a tuned value: tuned configs pass num_kv_splits explicitly."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, triton.cdiv(2 * sms, max(1, batch * num_kv_heads))))


def decode_attention_triton(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    *,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    num_kv_splits: int | None = None,
    dot_precision: str = "tf32x3",
    check_indices: bool = True,
) -> torch.Tensor:
    """One new token per request: q (batch, q_heads, head_dim) -> (batch, q_heads, head_dim) in q.dtype.

    Request b attends to slots kv_indices[kv_indptr[b] : kv_indptr[b + 1]] (an empty request gives zeros), exactly
    as reference.decode_attention. Launch parameters are keywords so tuned configs can be passed in; None takes a
    rule: default_num_kv_splits, block_n 64 (32 above head_dim 128). dot_precision "tf32x3" keeps the tensor-core
    dots within float32 accuracy of the reference; "tf32" is faster and 1e-3 to 3e-3 off. check_indices=False skips
    the index checks (device syncs), for CUDA-graph capture; the caller then guarantees the slots are in range.
    """
    launch = prepare_attention(
        q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer,
        dot_precision=dot_precision, check_indices=check_indices,
    )  # fmt: skip
    batch, q_heads, head_dim = q.shape
    if kv_indptr.numel() != batch + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {batch + 1} entries, got {kv_indptr.numel()}")
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32  # float32 K and V tiles of 64 x 256 overflow shared memory
    check_launch(block_n=block_n)
    kv_heads = k_pool.shape[1]
    splits = default_num_kv_splits(batch, kv_heads, launch.device) if num_kv_splits is None else num_kv_splits
    if splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {splits}")
    if batch == 0:
        return torch.empty_like(q)
    width = launch.out_width
    part = torch.empty(batch, q_heads, splits, width, dtype=torch.float32, device=launch.device)
    lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=launch.device)
    _decode_split_kernel[(batch, kv_heads, splits)](
        launch.q_rot, launch.q_qjl, k_pool.codes, v_pool.codes, k_pool.norms, v_pool.norms, kv_indptr, kv_indices,
        launch.k_tensors.codebook, launch.v_tensors.codebook, part, lse,
        float(sm_scale), float(logit_cap), splits,
        launch.q_rot.stride(0), launch.q_rot.stride(1),
        k_pool.codes.stride(0), k_pool.codes.stride(1), v_pool.codes.stride(0), v_pool.codes.stride(1),
        k_pool.norms.stride(0), k_pool.norms.stride(1), v_pool.norms.stride(0), v_pool.norms.stride(1),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=launch.group,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(launch.group)),
        BLOCK_N=block_n,
        HAS_CAP=logit_cap > 0,
        PRECISION=dot_precision,
        **launch.constexprs,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty(batch, q_heads, width, dtype=torch.float32, device=launch.device)
    _decode_reduce_kernel[(batch, q_heads)](
        part, lse, out, splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        DV=width,
        DV_PAD=triton.next_power_of_2(width),
    )  # fmt: skip
    return unrotate(out, v_quantizer, q.dtype)
