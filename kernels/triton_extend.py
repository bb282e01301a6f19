"""Fused extend (prefill) attention on the packed KV pool: each request's new tokens attend causally to its packed
prefix and to their own packed K/V, which the write kernel has stored first (DESIGN.md section 3: prefix-cache
invariance). Semantics: reference.extend_attention.

    kv slots of request b:  | prefix (cached)  | new tokens |        query i of the new tokens sees kv < prefix + i + 1

    grid (requests, kv_heads, row blocks): a program owns BLOCK_M rows of the flattened (new token, query head of the
    GQA group) grid, so one packed K/V tile is read once for the whole group; keys beyond the causal limit of its
    last row are never read

Same in-register unpack and rotated-domain online softmax as decode (triton_common.attend_tile); the launcher
rotates the queries once and the output back once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packed import PackedVectors
from .quantizer import TurboQuantizer
from .triton_common import attend_tile, check_launch, load_query, prepare_attention, store_rows, unrotate

__all__ = ["extend_attention_triton"]


@triton.jit
def _extend_kernel(
    q_ptr,
    qq_ptr,
    k_pool_ptr,
    v_pool_ptr,
    k_norm_ptr,
    v_norm_ptr,
    qo_indptr_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    k_cb_ptr,
    v_cb_ptr,
    out_ptr,
    sm_scale,
    logit_cap,
    stride_q_t,
    stride_q_h,
    stride_kp_s,
    stride_kp_h,
    stride_vp_s,
    stride_vp_h,
    stride_kn_s,
    stride_kn_h,
    stride_vn_s,
    stride_vn_h,
    stride_out_t,
    stride_out_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
    """Program (request b, KV head h, row block): rows r = token * GROUP + g of request b's new tokens."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qo_indptr_ptr + b).to(tl.int64)
    n_new = (tl.load(qo_indptr_ptr + b + 1) - q_start).to(tl.int32)
    kv_start = tl.load(kv_indptr_ptr + b).to(tl.int64)
    n_kv = (tl.load(kv_indptr_ptr + b + 1) - kv_start).to(tl.int32)
    prefix = n_kv - n_new

    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    row_mask = tok < n_new
    head = (h * GROUP + rows % GROUP).to(tl.int64)
    q_off = (q_start + tok) * stride_q_t + head * stride_q_h
    q0 = load_query(q_ptr + q_off, row_mask, K_S0_START, K_S0_U, K_S0_UP, K_S0_PIECES)
    q1 = tl.zeros([BLOCK_M, K_S1_PIECES * K_S1_UP], dtype=tl.float32)
    if K_NSEG == 2:
        q1 = load_query(q_ptr + q_off, row_mask, K_S1_START, K_S1_U, K_S1_UP, K_S1_PIECES)
    qq = tl.zeros([BLOCK_M, 8 * K_UP8], dtype=tl.float32)
    if K_PROD:
        qq = load_query(qq_ptr + q_off, row_mask, 0, K_U8, K_UP8, 8)

    # Keys visible to the block's last real row; 0 when the block holds no row of this request.
    last_tok = tl.minimum((tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    kv_end = tl.where(tl.program_id(2) * BLOCK_M < n_new * GROUP, prefix + last_tok + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, V_S0_PIECES * V_S0_UP], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, V_S1_PIECES * V_S1_UP], dtype=tl.float32)
    accq = tl.zeros([BLOCK_M, 8 * V_UP8], dtype=tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < kv_end
        # Every row sees key 0, so no row's running max stays -inf past the first tile (no NaN from inf - inf).
        visible = n_mask[None, :] & (offs[None, :] <= prefix + tok[:, None])
        slot = tl.load(kv_indices_ptr + kv_start + offs, mask=n_mask, other=0).to(tl.int64)
        m_i, l_i, acc0, acc1, accq = attend_tile(
            q0, q1, qq, m_i, l_i, acc0, acc1, accq,
            k_pool_ptr + slot * stride_kp_s + h * stride_kp_h, v_pool_ptr + slot * stride_vp_s + h * stride_vp_h,
            k_norm_ptr + slot * stride_kn_s + h * stride_kn_h, v_norm_ptr + slot * stride_vn_s + h * stride_vn_h,
            n_mask, visible, k_cb_ptr, v_cb_ptr, sm_scale, logit_cap, HAS_CAP, PRECISION,
            K_RAW, K_NSEG, K_PROD, K_QJL_OFF, K_U8, K_UP8, K_S0_START, K_S0_U,
            K_S0_UP, K_S0_PIECES, K_S0_BITS, K_S0_A_OFF, K_S0_A_BITS, K_S0_B_OFF, K_S1_START, K_S1_U, K_S1_UP,
            K_S1_PIECES, K_S1_BITS, K_S1_A_OFF, K_S1_A_BITS, K_S1_B_OFF, V_RAW, V_NSEG, V_PROD,
            V_QJL_OFF, V_U8, V_UP8, V_S0_START, V_S0_U, V_S0_UP, V_S0_PIECES, V_S0_BITS,
            V_S0_A_OFF, V_S0_A_BITS, V_S0_B_OFF, V_S1_START, V_S1_U, V_S1_UP, V_S1_PIECES, V_S1_BITS, V_S1_A_OFF,
            V_S1_A_BITS, V_S1_B_OFF
        )  # fmt: skip

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    out_row = out_ptr + (q_start + tok) * stride_out_t + head * stride_out_h
    store_rows(out_row, row_mask, acc0 * inv_l[:, None], V_S0_START, V_S0_U, V_S0_UP, V_S0_PIECES)
    if V_NSEG == 2:
        store_rows(out_row, row_mask, acc1 * inv_l[:, None], V_S1_START, V_S1_U, V_S1_UP, V_S1_PIECES)
    if V_PROD:
        store_rows(out_row + HEAD_DIM, row_mask, accq * inv_l[:, None], 0, V_U8, V_UP8, 8)


def extend_attention_triton(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    *,
    max_new_tokens: int | None = None,
    block_m: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
    dot_precision: str = "tf32x3",
    check_indices: bool = True,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves: q (tokens, q_heads, head_dim) -> same shape in
    q.dtype, exactly as reference.extend_attention.

    block_m None is 64 rows (32 above head_dim 128). max_new_tokens (the longest request's new tokens) sizes the
    grid; None reads it from qo_indptr (a device sync). check_indices=False skips the index checks (device syncs);
    the caller then guarantees them.
    """
    launch = prepare_attention(
        q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer,
        dot_precision=dot_precision, check_indices=check_indices,
    )  # fmt: skip
    if block_m is None:
        block_m = 64 if q.shape[-1] <= 128 else 32  # float32 query and value tiles of 64 x 256 need too many registers
    check_launch(block_m=block_m, block_n=block_n)
    if qo_indptr.dtype not in (torch.int32, torch.int64) or qo_indptr.dim() != 1 or qo_indptr.device != q.device:
        raise ValueError(f"qo_indptr: expected a 1-D int32/int64 tensor on {q.device}, got {qo_indptr.dtype} "
                         f"{tuple(qo_indptr.shape)} on {qo_indptr.device}")  # fmt: skip
    if qo_indptr.numel() != kv_indptr.numel():
        raise ValueError(f"qo_indptr ({qo_indptr.numel()} entries) must match kv_indptr ({kv_indptr.numel()})")
    qo_indptr = qo_indptr.contiguous()
    if check_indices:
        new, kv = qo_indptr.diff(), kv_indptr.diff()
        if int(qo_indptr[0]) != 0 or int(qo_indptr[-1]) != q.shape[0] or bool((new < 0).any()):
            raise ValueError(f"qo_indptr must rise from 0 to the {q.shape[0]} rows of q, got {qo_indptr.tolist()}")
        if bool((kv < new).any()):
            raise ValueError(
                "every request needs at least as many kv slots as new tokens (new tokens are written first): "
                f"new {new.tolist()}, kv {kv.tolist()}"
            )
    tokens, q_heads, head_dim = q.shape
    requests = qo_indptr.numel() - 1
    if max_new_tokens is None:
        max_new_tokens = int(qo_indptr.diff().max()) if requests else 0
    width = launch.out_width
    out = torch.zeros(tokens, q_heads, width, dtype=torch.float32, device=launch.device)
    if tokens and requests and max_new_tokens > 0:
        grid = (requests, k_pool.shape[1], triton.cdiv(max_new_tokens * launch.group, block_m))
        _extend_kernel[grid](
            launch.q_rot, launch.q_qjl, k_pool.codes, v_pool.codes, k_pool.norms, v_pool.norms, qo_indptr, kv_indptr,
            kv_indices,
            launch.k_tensors.codebook, launch.v_tensors.codebook, out,
            float(sm_scale), float(logit_cap),
            launch.q_rot.stride(0), launch.q_rot.stride(1),
            k_pool.codes.stride(0), k_pool.codes.stride(1), v_pool.codes.stride(0), v_pool.codes.stride(1),
            k_pool.norms.stride(0), k_pool.norms.stride(1), v_pool.norms.stride(0), v_pool.norms.stride(1),
            out.stride(0), out.stride(1),
            GROUP=launch.group,
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HAS_CAP=logit_cap > 0,
            PRECISION=dot_precision,
            **launch.constexprs,
            num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
    return unrotate(out, v_quantizer, q.dtype)
