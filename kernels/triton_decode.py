"""Fused decode attention on the packed KV pool: one new token per request, split-K over long contexts.

Semantics: reference.decode_attention (docs/ARCHITECTURE.md section 3). The launcher rotates the query once
(sm_scale * R q, and the scaled S R q for a prod K) into the kernels' tile order (triton_common); the split kernel
reads each request's code rows once, expands each byte through a pair table into bf16 values in registers and runs
an online softmax; the reduce kernel merges the splits by their log-sum-exp; the launcher rotates the merged output
back once. Nothing dequantized is ever written to memory.

Sliding window (a runtime argument, so one compiled kernel serves every window; -1: none): request b's query at
position kv_len - 1 sees the keys from kv_len - 1 - W on, and the splits share only those: the slots before them
are never read.

    grid (batch, kv_heads, num_kv_splits): one program reads a BLOCK_N tile of K/V code rows once for the GROUP =
    q_heads / kv_heads query heads of its KV head (GROUP rows, padded to a power of two, not to 16)

Bytes per token and KV head (head_dim 128, float16 norms), K + V, against a bf16 cache:

    bf16 512 B  |  4 bits 132 B (3.9x less)  |  3 bits 100 B (5.1x)  |  2 bits 68 B (7.5x)  |  + the 4-byte slot index

Decode at long context is memory-bound, so the target is these bytes at close to HBM bandwidth: at 4 bits an H200
leaves ~33 warp-instructions per token-head for everything (`python -m tq_serve.bench kernels --static` counts them).
The split count fills the SMs from batch x kv_heads alone (no device sync, CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedVectors
from .quantizer import TurboQuantizer
from .triton_common import (
    ABSENT,
    INTERPRETED,
    attend_tile,
    check_launch,
    load_part,
    load_table,
    prepare_attention,
    store_part,
    unrotate,
    window_arg,
)

__all__ = ["decode_attention_triton", "default_num_kv_splits"]


@triton.jit(do_not_specialize=["window"])
def _decode_split_kernel(
    q_ptr,
    k_codes_ptr,
    k_norms_ptr,
    v_codes_ptr,
    v_norms_ptr,
    k_pairs_ptr,
    k_pairs_f32_ptr,
    v_pairs_ptr,
    v_pairs_f32_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    part_ptr,
    lse_ptr,
    logit_cap,
    window,
    num_splits,
    stride_q_b,
    stride_q_h,
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    stride_part_b,
    stride_part_h,
    stride_part_s,
    stride_lse_b,
    stride_lse_h,
    K: tl.constexpr,
    V: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """Program (request b, KV head h, split s): partial softmax over the s-th share of request b's slots (of its
    window's, if WINDOWED: the runtime `window` >= 0)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    kv_len = (tl.load(kv_indptr_ptr + b + 1) - kv_start).to(tl.int32)
    # The window's first key (0 without one): the splits share the keys from there on, never reading the others.
    win_lo = 0
    if WINDOWED:  # a constexpr branch: without a window the kernel is the plain one (no extra registers)
        win_lo = tl.maximum(kv_len - 1 - window, 0)
    # Whole tiles per split, so that only a split's last tile is ragged.
    per_split = tl.cdiv(tl.cdiv(kv_len - win_lo, num_splits), BLOCK_N) * BLOCK_N
    lo = win_lo + split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    g = tl.arange(0, BLOCK_H)
    h_mask = g < GROUP
    head = (h * GROUP + g).to(tl.int64)
    q_row = q_ptr + b.to(tl.int64) * stride_q_b + head * stride_q_h
    q0 = load_part(q_row, h_mask, K, 0)
    q1 = tl.zeros([BLOCK_H, 1], dtype=tl.float32)
    if K.seg1.kind != ABSENT:
        q1 = load_part(q_row, h_mask, K, 1)
    qs = tl.zeros([BLOCK_H, 1], dtype=tl.float32)
    if K.signs.kind != ABSENT:
        qs = load_part(q_row, h_mask, K, 2)
    EXACT: tl.constexpr = PRECISION != "bf16"
    k_table = load_table(k_pairs_ptr, k_pairs_f32_ptr, K, EXACT)
    v_table = load_table(v_pairs_ptr, v_pairs_f32_ptr, V, EXACT)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Shapes from nested spec fields go through constexpr locals (Triton 3.6 takes no bare ints there).
    W0: tl.constexpr = V.seg0.width
    W1: tl.constexpr = V.seg1.width
    WS: tl.constexpr = V.signs.width
    acc0 = tl.zeros([BLOCK_H, W0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, W1], dtype=tl.float32)
    accs = tl.zeros([BLOCK_H, WS], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < hi
        slot = tl.load(kv_indices_ptr + kv_start + offs, mask=n_mask, other=0).to(tl.int64)
        m_i, l_i, acc0, acc1, accs = attend_tile(
            q0, q1, qs, m_i, l_i, acc0, acc1, accs,
            k_codes_ptr + slot * stride_kc_s + h * stride_kc_h, v_codes_ptr + slot * stride_vc_s + h * stride_vc_h,
            k_norms_ptr + slot * stride_kn_s + h * stride_kn_h, v_norms_ptr + slot * stride_vn_s + h * stride_vn_h,
            n_mask, n_mask[None, :], k_table, v_table, logit_cap, K, V, BLOCK_N, HAS_CAP, PRECISION, INTERPRETER,
            False,  # every tile a split reads holds a visible key: no row's max stays -inf
        )  # fmt: skip

    # An empty split (short request) leaves l_i = 0: it stores lse = -inf, which the reduce skips.
    has_keys = l_i > 0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    part_row = part_ptr + b.to(tl.int64) * stride_part_b + head * stride_part_h + split * stride_part_s
    store_part(part_row, h_mask, acc0 * inv_l[:, None], V, 0)
    if V.seg1.kind != ABSENT:
        store_part(part_row, h_mask, acc1 * inv_l[:, None], V, 1)
    if V.signs.kind != ABSENT:
        store_part(part_row, h_mask, accs * inv_l[:, None], V, 2)
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
    WIDTH: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
):
    """Program (request b, query head): merge the splits' partial outputs by their log-sum-exp (rotated domain)."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, WIDTH_PAD)
    mask = offs < WIDTH
    e_max = float("-inf")
    e_sum = 0.0
    acc = tl.zeros([WIDTH_PAD], dtype=tl.float32)
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


MAX_KV_SPLITS = 64
PROGRAMS_PER_SM = 4  # resident programs per SM at the default config (registers allow 3-4): room to hide latency


def default_num_kv_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits so that batch x kv_heads x splits programs give every SM about PROGRAMS_PER_SM of them, at most
    MAX_KV_SPLITS (the reduce reads every split). From the batch alone: a captured CUDA graph keeps its grid."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_KV_SPLITS, triton.cdiv(PROGRAMS_PER_SM * sms, max(1, batch * num_kv_heads))))


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
    num_stages: int = 1,
    num_kv_splits: int | None = None,
    dot_precision: str = "bf16",
    check_indices: bool = True,
    sliding_window_size: int | None = None,
) -> torch.Tensor:
    """One new token per request: q (batch, q_heads, head_dim) -> (batch, q_heads, head_dim) in q.dtype.

    Request b attends to slots kv_indices[kv_indptr[b] : kv_indptr[b + 1]] (an empty request gives zeros), exactly
    as reference.decode_attention; with a sliding window W, to its last W + 1 of them only. Launch parameters are
    keywords so tuned configs can be passed in; None takes a rule: default_num_kv_splits, block_n 128 (64 above
    head_dim 128). dot_precision "bf16" (bf16 operands, float32
    accumulation) is the fast path; "ieee" reads float32 centroids for an exact comparison with the reference.
    check_indices=False skips the index checks (device syncs), for CUDA-graph capture; the caller then guarantees
    the slots are in range.
    """
    launch = prepare_attention(
        q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale,
        dot_precision=dot_precision, check_indices=check_indices,
    )  # fmt: skip
    batch, q_heads, head_dim = q.shape
    if kv_indptr.numel() != batch + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {batch + 1} entries, got {kv_indptr.numel()}")
    if block_n is None:
        block_n = 128 if head_dim <= 128 else 64
    check_launch(block_n=block_n)
    kv_heads = k_pool.codes.shape[1]
    splits = default_num_kv_splits(batch, kv_heads, launch.device) if num_kv_splits is None else num_kv_splits
    if splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {splits}")
    if batch == 0:
        return torch.empty_like(q)
    width = launch.v_spec.width
    part = torch.empty(batch, q_heads, splits, width, dtype=torch.float32, device=launch.device)
    lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=launch.device)
    kt, vt = launch.k_tensors, launch.v_tensors
    kc, vc = launch.k_codes, launch.v_codes
    _decode_split_kernel[(batch, kv_heads, splits)](
        launch.q_tiles, kc, k_pool.norms, vc, v_pool.norms, kt.pairs_bf16, kt.pairs_f32, vt.pairs_bf16, vt.pairs_f32,
        kv_indptr, kv_indices, part, lse, float(logit_cap), window_arg(sliding_window_size), splits,
        launch.q_tiles.stride(0), launch.q_tiles.stride(1), kc.stride(0), kc.stride(1),
        k_pool.norms.stride(0), k_pool.norms.stride(1), vc.stride(0), vc.stride(1),
        v_pool.norms.stride(0), v_pool.norms.stride(1),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        K=launch.k_spec,
        V=launch.v_spec,
        GROUP=launch.group,
        BLOCK_H=triton.next_power_of_2(launch.group),
        BLOCK_N=block_n,
        HAS_CAP=logit_cap > 0,
        PRECISION=dot_precision,
        INTERPRETER=INTERPRETED,
        WINDOWED=sliding_window_size is not None and sliding_window_size >= 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    out = torch.empty(batch, q_heads, width, dtype=torch.float32, device=launch.device)
    _decode_reduce_kernel[(batch, q_heads)](
        part, lse, out, splits,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        WIDTH=width,
        WIDTH_PAD=triton.next_power_of_2(width),
    )  # fmt: skip
    return unrotate(out, v_quantizer, q.dtype)
