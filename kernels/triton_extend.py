"""Fused extend (prefill) attention on the packed KV pool: each request's new tokens attend causally to its packed
prefix and to their own packed K/V, which the write kernel stored first (docs/ARCHITECTURE.md section 3: prefix-cache
invariance). Semantics: reference.extend_attention.

    kv slots of request b:  | prefix (cached)  | new tokens |        query i of the new tokens sees kv < prefix + i + 1

    grid (requests, kv_heads, row blocks): a program owns BLOCK_M rows of the flattened (new token, query head of the
    GQA group) grid, so one K/V tile is read once for the whole group; keys beyond the causal limit of its last row
    are never read

Unpacking a code row costs about as much as attending one query row to it, so it must not be repeated per row
block. When every request's rows fit one row block (decode-like extends, short chunks), each program unpacks its
tiles itself (the same in-register pair-table unpack and online softmax as decode: triton_common.attend_tile).
When a request spans several row blocks, `_unpack_kernel` first expands every kv position once into a scratch of
bf16 values (norms applied, in the kernels' tile order) and the attention kernel reads that scratch as raw vectors:
each code row is unpacked exactly once per call, and the attention is a plain bf16 flash attention. The launcher
rotates the queries once and the output back once.

Sliding window (a runtime argument, so one compiled kernel serves every window; -1: none): query row at position p
sees the keys p - W .. p. A row block starts at the key tile holding its first row's window start and never reads a
key below that start; inside a tile each row masks the keys outside its own window. The unpack-once path unpacks
only the kv positions some query's window holds.
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
    RAW,
    PartSpec,
    RecordSpec,
    attend_tile,
    check_launch,
    load_part,
    load_table,
    part_values,
    prepare_attention,
    store_part,
    unrotate,
    window_arg,
)

__all__ = ["extend_attention_triton"]


@triton.jit(do_not_specialize=["window"])
def _extend_kernel(
    q_ptr,
    k_codes_ptr,
    k_norms_ptr,
    v_codes_ptr,
    v_norms_ptr,
    k_pairs_ptr,
    k_pairs_f32_ptr,
    v_pairs_ptr,
    v_pairs_f32_ptr,
    qo_indptr_ptr,
    kv_indptr_ptr,
    kv_indices_ptr,
    out_ptr,
    logit_cap,
    window,
    stride_q_t,
    stride_q_h,
    stride_kc_s,
    stride_kc_h,
    stride_kn_s,
    stride_kn_h,
    stride_vc_s,
    stride_vc_h,
    stride_vn_s,
    stride_vn_h,
    stride_out_t,
    stride_out_h,
    K: tl.constexpr,
    V: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    """Program (request b, KV head h, row block): rows r = token * GROUP + g of request b's new tokens. WINDOWED
    (window >= 0) compiles the window's masks in; the window itself is the runtime `window`."""
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
    q_row = q_ptr + (q_start + tok) * stride_q_t + head * stride_q_h
    q0 = load_part(q_row, row_mask, K, 0)
    q1 = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if K.seg1.kind != ABSENT:
        q1 = load_part(q_row, row_mask, K, 1)
    qs = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if K.signs.kind != ABSENT:
        qs = load_part(q_row, row_mask, K, 2)
    EXACT: tl.constexpr = PRECISION != "bf16"
    k_table = load_table(k_pairs_ptr, k_pairs_f32_ptr, K, EXACT)
    v_table = load_table(v_pairs_ptr, v_pairs_f32_ptr, V, EXACT)

    # Keys visible to the block's last real row; 0 when the block holds no row of this request.
    last_tok = tl.minimum((tl.program_id(2) * BLOCK_M + BLOCK_M - 1) // GROUP, n_new - 1)
    kv_end = tl.where(tl.program_id(2) * BLOCK_M < n_new * GROUP, prefix + last_tok + 1, 0)
    # With a window: the block's first row sees no key below `lowest`, nor does any later row; keys below it are
    # never read, and each row also masks the keys below its own window start (row_lo).
    lowest = 0
    if WINDOWED:
        lowest = tl.maximum(prefix + (tl.program_id(2) * BLOCK_M) // GROUP - window, 0)
        row_lo = prefix + tok - window
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Shapes from nested spec fields go through constexpr locals (Triton 3.6 takes no bare ints there).
    W0: tl.constexpr = V.seg0.width
    W1: tl.constexpr = V.seg1.width
    WS: tl.constexpr = V.signs.width
    acc0 = tl.zeros([BLOCK_M, W0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, W1], dtype=tl.float32)
    accs = tl.zeros([BLOCK_M, WS], dtype=tl.float32)
    for n0 in range((lowest // BLOCK_N) * BLOCK_N, kv_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        if WINDOWED:
            # A row with no visible key yet keeps m = -inf; attend_tile (GUARD) shifts it by 0, no inf - inf.
            n_mask = (offs >= lowest) & (offs < kv_end)
            visible = n_mask[None, :] & (offs[None, :] <= prefix + tok[:, None]) & (offs[None, :] >= row_lo[:, None])
        else:
            n_mask = offs < kv_end
            # Every row sees key 0, so no row's running max stays -inf past the first tile (no NaN from inf - inf).
            visible = n_mask[None, :] & (offs[None, :] <= prefix + tok[:, None])
        slot = tl.load(kv_indices_ptr + kv_start + offs, mask=n_mask, other=0).to(tl.int64)
        m_i, l_i, acc0, acc1, accs = attend_tile(
            q0, q1, qs, m_i, l_i, acc0, acc1, accs,
            k_codes_ptr + slot * stride_kc_s + h * stride_kc_h, v_codes_ptr + slot * stride_vc_s + h * stride_vc_h,
            k_norms_ptr + slot * stride_kn_s + h * stride_kn_h, v_norms_ptr + slot * stride_vn_s + h * stride_vn_h,
            n_mask, visible, k_table, v_table, logit_cap, K, V, BLOCK_N, HAS_CAP, PRECISION, INTERPRETER, WINDOWED,
        )  # fmt: skip

    inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
    out_row = out_ptr + (q_start + tok) * stride_out_t + head * stride_out_h
    store_part(out_row, row_mask, acc0 * inv_l[:, None], V, 0)
    if V.seg1.kind != ABSENT:
        store_part(out_row, row_mask, acc1 * inv_l[:, None], V, 1)
    if V.signs.kind != ABSENT:
        store_part(out_row, row_mask, accs * inv_l[:, None], V, 2)


@triton.jit
def _unpack_part(
    row, n_mask, table, scale, out, SPEC: tl.constexpr, INDEX: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr
):
    if INDEX == 0:
        PART: tl.constexpr = SPEC.seg0
    elif INDEX == 1:
        PART: tl.constexpr = SPEC.seg1
    else:
        PART: tl.constexpr = SPEC.signs
    values = part_values(row, n_mask, table, SPEC, INDEX, BLOCK_N, EXACT).to(tl.float32) * scale[:, None]
    cols = tl.arange(0, PART.width)
    tl.store(out[:, None] + (PART.col + cols)[None, :], values.to(out.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _unpack_kernel(
    codes_ptr,
    norms_ptr,
    pairs_ptr,
    pairs_f32_ptr,
    kv_indices_ptr,
    need_ptr,
    scratch_ptr,
    num_kv,
    stride_c_s,
    stride_c_h,
    stride_n_s,
    stride_n_h,
    stride_x_t,
    stride_x_h,
    SPEC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_NEED: tl.constexpr,
):
    """Program (BLOCK_N kv positions, KV head h): their vectors' parts, norms applied, into scratch rows (only those
    with need[position] != 0 when HAS_NEED; the others are left as they are)."""
    h = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs < num_kv
    if HAS_NEED:  # only the positions some query's window holds: the others are never read
        n_mask = n_mask & (tl.load(need_ptr + offs, mask=n_mask, other=0) != 0)
    slot = tl.load(kv_indices_ptr + offs, mask=n_mask, other=0).to(tl.int64)
    row = codes_ptr + slot * stride_c_s + h * stride_c_h
    norm = norms_ptr + slot * stride_n_s + h * stride_n_h
    out = scratch_ptr + offs.to(tl.int64) * stride_x_t + h * stride_x_h
    EXACT: tl.constexpr = PRECISION != "bf16"
    table = load_table(pairs_ptr, pairs_f32_ptr, SPEC, EXACT)
    scale = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    if SPEC.norms > 0:
        scale = tl.load(norm, mask=n_mask, other=0.0).to(tl.float32)
    _unpack_part(row, n_mask, table, scale, out, SPEC, 0, BLOCK_N, EXACT)
    if SPEC.seg1.kind != ABSENT:
        _unpack_part(row, n_mask, table, scale, out, SPEC, 1, BLOCK_N, EXACT)
    if SPEC.signs.kind != ABSENT:
        gamma = tl.load(norm + 1, mask=n_mask, other=0.0).to(tl.float32)
        _unpack_part(row, n_mask, table, scale * gamma, out, SPEC, 2, BLOCK_N, EXACT)


def _scratch_spec(spec: RecordSpec) -> RecordSpec:
    """The spec of an unpacked scratch row: each part as RAW values at its tile columns, norms already applied."""

    def raw(part: PartSpec) -> PartSpec:
        if not part.kind:
            return part
        return PartSpec(RAW.value, part.col, 0, part.width, part.width, 1, 16, 1, 0, part.col, part.width, 0)

    return RecordSpec(raw(spec.seg0), raw(spec.seg1), raw(spec.signs), 0, spec.width, 2)


def _unpacked(
    pool: PackedVectors,
    codes: torch.Tensor,
    spec: RecordSpec,
    tensors,
    kv_indices,
    num_kv: int,
    dot_precision: str,
    need: torch.Tensor | None = None,
) -> torch.Tensor:
    """The vectors at kv_indices[:num_kv], unpacked once: (num_kv, kv_heads, spec.width), bf16 (float32 for the
    exact dot precisions), norms applied, in tile order. With `need` (num_kv,) int8, only the positions it marks
    (the other rows are left uninitialised: the attention kernel must not read them)."""
    heads = codes.shape[1]
    dtype = torch.bfloat16 if dot_precision == "bf16" else torch.float32
    scratch = torch.empty(num_kv, heads, spec.width, dtype=dtype, device=codes.device)
    if num_kv:
        _unpack_kernel[(triton.cdiv(num_kv, UNPACK_BLOCK), heads)](
            codes, pool.norms, tensors.pairs_bf16, tensors.pairs_f32, kv_indices,
            kv_indices if need is None else need, scratch, num_kv,
            codes.stride(0), codes.stride(1), pool.norms.stride(0), pool.norms.stride(1),
            scratch.stride(0), scratch.stride(1),
            SPEC=spec, BLOCK_N=UNPACK_BLOCK, PRECISION=dot_precision, HAS_NEED=need is not None,
        )  # fmt: skip
    return scratch


UNPACK_BLOCK = 64


def _window_positions(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_kv: int, window: int) -> torch.Tensor:
    """(num_kv,) int8: whether kv position p (of the flat kv_indices) is in the window of some query of its request,
    i.e. at or after its request's first new token's window start. On the device, without a sync."""
    starts = kv_indptr.to(torch.int64)
    pos = torch.arange(num_kv, device=kv_indptr.device)
    request = torch.searchsorted(starts[1:].contiguous(), pos, right=True)
    lo = (starts.diff() - qo_indptr.to(torch.int64).diff() - window).clamp_min(0)
    return ((pos - starts[request]) >= lo[request]).to(torch.int8)


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
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 1,
    dot_precision: str = "bf16",
    check_indices: bool = True,
    sliding_window_size: int | None = None,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves (and within a sliding window, if any): q (tokens,
    q_heads, head_dim) -> same shape in q.dtype, exactly as reference.extend_attention.

    block_m None is 32 rows (16 above head_dim 128). max_new_tokens (the longest request's new tokens) sizes the
    grid; None reads it from qo_indptr (a device sync). check_indices=False skips the index checks (device syncs);
    the caller then guarantees them. The unpack-once path (requests longer than a row block) reads the number of kv
    positions from kv_indptr (one sync): extends are not captured in CUDA graphs.
    """
    launch = prepare_attention(
        q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale,
        dot_precision=dot_precision, check_indices=check_indices,
    )  # fmt: skip
    if block_m is None:
        block_m = 32 if q.shape[-1] <= 128 else 16  # float32 accumulators of 32 x 256 fill the registers
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
    width = launch.v_spec.width
    out = torch.zeros(tokens, q_heads, width, dtype=torch.float32, device=launch.device)
    if not (tokens and requests and max_new_tokens > 0):
        return unrotate(out, v_quantizer, q.dtype)
    kv_heads = k_pool.codes.shape[1]
    window = window_arg(sliding_window_size)
    k_spec, v_spec, kc, vc = launch.k_spec, launch.v_spec, launch.k_codes, launch.v_codes
    k_norms, v_norms = k_pool.norms, v_pool.norms
    if max_new_tokens * launch.group > block_m:
        # Several row blocks per request would each unpack the whole prefix: unpack every kv position once instead,
        # and attend over the bf16 scratch (norms applied, no tables).
        num_kv = int(kv_indptr[-1])
        need = None if window < 0 else _window_positions(qo_indptr, kv_indptr, num_kv, window)
        kc = _unpacked(k_pool, kc, k_spec, launch.k_tensors, kv_indices, num_kv, dot_precision, need)
        vc = _unpacked(v_pool, vc, v_spec, launch.v_tensors, kv_indices, num_kv, dot_precision, need)
        k_spec, v_spec, k_norms, v_norms = _scratch_spec(k_spec), _scratch_spec(v_spec), kc, vc
        kv_indices = torch.arange(num_kv, dtype=torch.int32, device=launch.device)
    grid = (requests, kv_heads, triton.cdiv(max_new_tokens * launch.group, block_m))
    kt, vt = launch.k_tensors, launch.v_tensors
    _extend_kernel[grid](
        launch.q_tiles, kc, k_norms, vc, v_norms,
        kt.pairs_bf16, kt.pairs_f32, vt.pairs_bf16, vt.pairs_f32, qo_indptr, kv_indptr, kv_indices, out,
        float(logit_cap), window, launch.q_tiles.stride(0), launch.q_tiles.stride(1), kc.stride(0), kc.stride(1),
        k_norms.stride(0), k_norms.stride(1), vc.stride(0), vc.stride(1),
        v_norms.stride(0), v_norms.stride(1), out.stride(0), out.stride(1),
        K=k_spec,
        V=v_spec,
        GROUP=launch.group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_CAP=logit_cap > 0,
        PRECISION=dot_precision,
        INTERPRETER=INTERPRETED,
        WINDOWED=window >= 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return unrotate(out, v_quantizer, q.dtype)
