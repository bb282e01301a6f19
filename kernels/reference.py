"""Torch reference of attention over the packed KV pool, in the rotated domain (docs/ARCHITECTURE.md section 3).

These are the semantics every Triton kernel must match on the same packed data, and the CPU serving path itself.
Only the slots a batch names are read, never the whole pool; nothing is de-rotated per token:

    score_i = sm_scale * (n_i (R q) . c[idx_i]  [+ n_i gamma_i c_d (S R q) . s_i])
    out     = R^T (sum_i p_i n_i c[idx_i]  [+ c_d S^T sum_i p_i n_i gamma_i s_i])     (c_d = qjl_scale(d))

Pools, one per layer and per K/V: PackedVectors of that layer's VectorLayout, codes uint8 (num_slots, num_kv_heads,
code_bytes) and norms (num_slots, num_kv_heads, norms_per_vector) (packed.py). GQA: query head h reads KV head
h // (num_q_heads // num_kv_heads).

Batch metadata as SGLang's Triton backend passes it:

    decode   q (B, Hq, d); request b reads slots kv_indices[kv_indptr[b] : kv_indptr[b+1]]
    extend   q (T, Hq, d); request b owns query rows qo_indptr[b] : qo_indptr[b+1] (its new tokens) and slots
             kv_indices[kv_indptr[b] : kv_indptr[b+1]] = its prefix followed by its new tokens, which write_kv has
             already stored (write first, then attend: a later prefix-cache hit sees exactly the same K/V)

                 kv slots:  | prefix (cached)  | new tokens |
                 query i of the new tokens sees kv positions < prefix_len + i + 1

Sliding window (SGLang's RadixAttention.sliding_window_size W; None or -1: none), as SGLang's torch_native backend
masks it: the query at position p sees key positions k with p - W <= k <= p (W + 1 keys, itself included). Slots
outside a request's window are never read (a decode reads its last W + 1 slots; an extend from its first new
token's window on), so what they hold, even NaN, cannot reach an output.
"""

from __future__ import annotations

import torch

from .launch_checks import check_pool, check_slots
from .packed import PackedVectors
from .quantizer import TurboQuantizer


def window_of(sliding_window_size: int | None) -> int | None:
    """SGLang's sliding_window_size as a window: None for none (None or negative), else W >= 0."""
    if sliding_window_size is None or sliding_window_size < 0:
        return None
    return int(sliding_window_size)


def decode_window_start(kv_len: int, window: int | None) -> int:
    """First key position a decode query (position kv_len - 1) sees."""
    return 0 if window is None else max(0, kv_len - 1 - window)


def _check_pool(name: str, pool: PackedVectors, qz: TurboQuantizer) -> None:
    check_pool(name, pool, qz.layout)


def _check_indices(name: str, indices: torch.Tensor, num_slots: int) -> None:
    check_slots(name, indices, num_slots)


def write_kv(
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    k: torch.Tensor,
    v: torch.Tensor,
    out_cache_loc: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    *,
    saturated: torch.Tensor | None = None,
) -> None:
    """Quantize k, v (T, Hkv, d) and store them at pool slots out_cache_loc (T,), in place. `saturated` (an integer
    tensor, one element, on the pool's device), if given, counts the norms stored saturated at the norm dtype's
    largest finite value (TurboQuantizer.quantize)."""
    _check_pool("k_pool", k_pool, k_quantizer)
    _check_pool("v_pool", v_pool, v_quantizer)
    if k.shape != v.shape or k.dim() != 3 or k.shape[1] != k_pool.shape[1] or k.shape[0] != out_cache_loc.numel():
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be (tokens, {k_pool.shape[1]}, head_dim) with "
            f"tokens = len(out_cache_loc) = {out_cache_loc.numel()}"
        )
    _check_indices("out_cache_loc", out_cache_loc, k_pool.shape[0])
    loc = out_cache_loc.long()
    if k_quantizer is v_quantizer:  # one pass over K and V together: half the calls (quantize is row by row on CPU)
        codes, norms = k_quantizer.quantize(torch.cat([k, v]), saturated)
        t = k.shape[0]
        k_packed, v_packed = PackedVectors(codes[:t], norms[:t]), PackedVectors(codes[t:], norms[t:])
    else:
        k_packed, v_packed = k_quantizer.quantize(k, saturated), v_quantizer.quantize(v, saturated)
    k_pool.index_copy_(loc, k_packed)
    v_pool.index_copy_(loc, v_packed)


def attend_packed(
    q: torch.Tensor,
    k_packed: PackedVectors,
    v_packed: PackedVectors,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    causal_offset: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One request: q (Lq, Hq, d) over packed k/v (Lk, Hkv) -> (Lq, Hq, d) float32.

    causal_offset = Lk - Lq makes query i see keys < causal_offset + i + 1; None attends to all keys. window W
    (with a causal_offset) also hides the keys < causal_offset + i - W.
    """
    lq, hq, d = q.shape
    lk, hkv = k_packed.shape[:2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    group = hq // hkv
    q_rot, q_qjl = k_quantizer.rotate_query(q.view(lq, hkv, group, d))
    k_vals, k_qjl = k_quantizer.rotated(k_packed)  # (Lk, Hkv, d)
    scores = torch.einsum("qhgd,khd->hgqk", q_rot, k_vals)
    if k_qjl is not None:
        scores += torch.einsum("qhgd,khd->hgqk", q_qjl, k_qjl)
    scores *= sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if causal_offset is not None:
        pos_q = torch.arange(lq, device=q.device).unsqueeze(1) + causal_offset
        pos_k = torch.arange(lk, device=q.device).unsqueeze(0)
        visible = pos_k <= pos_q
        if window is not None:
            visible &= pos_k >= pos_q - window
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    v_vals, v_qjl = v_quantizer.rotated(v_packed)
    acc = torch.einsum("hgqk,khd->qhgd", probs, v_vals)
    acc_qjl = None if v_qjl is None else torch.einsum("hgqk,khd->qhgd", probs, v_qjl)
    return v_quantizer.unrotate_output(acc, acc_qjl).reshape(lq, hq, d)


def packed_scores(q: torch.Tensor, k_packed: PackedVectors, k_quantizer: TurboQuantizer) -> torch.Tensor:
    """Raw scores <q, k~> for q (Lq, H, d) and packed keys (Lk, H), in the rotated domain: (H, Lq, Lk)."""
    q_rot, q_qjl = k_quantizer.rotate_query(q)
    k_vals, k_qjl = k_quantizer.rotated(k_packed)
    scores = torch.einsum("qhd,khd->hqk", q_rot, k_vals)
    if k_qjl is not None:
        scores += torch.einsum("qhd,khd->hqk", q_qjl, k_qjl)
    return scores


def _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer) -> None:
    _check_pool("k_pool", k_pool, k_quantizer)
    _check_pool("v_pool", v_pool, v_quantizer)
    if q.dim() != 3 or q.shape[-1] != k_quantizer.layout.head_dim:
        raise ValueError(f"q must be (rows, q_heads, {k_quantizer.layout.head_dim}), got {tuple(q.shape)}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of the pool's KV heads ({k_pool.shape[1]})")
    if kv_indptr.dim() != 1 or int(kv_indptr[-1]) > kv_indices.numel():
        raise ValueError(f"kv_indptr (ends at {int(kv_indptr[-1])}) overruns kv_indices ({kv_indices.numel()})")
    _check_indices("kv_indices", kv_indices[: int(kv_indptr[-1])], k_pool.shape[0])


def _extend_bounds(q: torch.Tensor, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor) -> tuple[list[int], list[int]]:
    """An extend's (qo_indptr, kv_indptr) as host lists, checked: matching lengths, q rows, and every request with at
    least as many kv slots as new tokens (the new tokens are written before they are attended)."""
    if qo_indptr.numel() != kv_indptr.numel() or int(qo_indptr[-1]) != q.shape[0]:
        raise ValueError(
            f"qo_indptr ({qo_indptr.numel()} entries, ends at {int(qo_indptr[-1])}) must match kv_indptr "
            f"({kv_indptr.numel()} entries) and q rows ({q.shape[0]})"
        )
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        n_new, n_kv = qo[b + 1] - qo[b], kv[b + 1] - kv[b]
        if n_kv < n_new:
            raise ValueError(f"request {b}: {n_new} new tokens but only {n_kv} kv slots (new tokens are written first)")
    return qo, kv


def decode_attention(
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
    sliding_window_size: int | None = None,
) -> torch.Tensor:
    """One new token per request: q (B, Hq, d) -> (B, Hq, d) in q.dtype. With a window, request b reads only its
    last W + 1 slots."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    window = window_of(sliding_window_size)
    out = torch.zeros_like(q)
    bounds = kv_indptr.tolist()
    for b in range(q.shape[0]):
        first = bounds[b] + decode_window_start(bounds[b + 1] - bounds[b], window)
        slots = kv_indices[first : bounds[b + 1]].long()
        if slots.numel() == 0:
            continue
        out[b] = attend_packed(
            q[b : b + 1],
            k_pool.index_select(slots),
            v_pool.index_select(slots),
            k_quantizer,
            v_quantizer,
            sm_scale,
            logit_cap,
        )[0].to(q.dtype)
    return out


def extend_attention(
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
    sliding_window_size: int | None = None,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves: q (T, Hq, d) -> (T, Hq, d) in q.dtype. With a
    window, request b reads its slots from its first new token's window start on."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    qo, kv = _extend_bounds(q, qo_indptr, kv_indptr)
    window = window_of(sliding_window_size)
    out = torch.zeros_like(q)
    for b in range(len(qo) - 1):
        n_new, n_kv = qo[b + 1] - qo[b], kv[b + 1] - kv[b]
        if n_new == 0:
            continue
        lo = 0 if window is None else max(0, n_kv - n_new - window)  # the first new token's window start
        slots = kv_indices[kv[b] + lo : kv[b + 1]].long()
        out[qo[b] : qo[b + 1]] = attend_packed(
            q[qo[b] : qo[b + 1]],
            k_pool.index_select(slots),
            v_pool.index_select(slots),
            k_quantizer,
            v_quantizer,
            sm_scale,
            logit_cap,
            causal_offset=n_kv - n_new - lo,
            window=window,
        ).to(q.dtype)
    return out
