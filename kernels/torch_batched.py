"""Decode attention over the packed pool for a whole batch, in torch: the CPU serving path.

Same semantics as reference.decode_attention (the specification; tests compare the two on the same packed data),
different schedule. A CPU decode step spends its time in unpacking and in per-call overhead, so:

- The slots of a group of requests are gathered and unpacked together, by one table gather per packed byte
  (TurboQuantizer.storage_decode). Unpacking is element-wise, so it gives each record the same values whatever the
  batch. Coordinates stay in the order they are stored; the query is permuted to that order instead (d values
  rather than L x d), and norms scale the scores and probabilities rather than the vectors.
- The attention itself runs request by request, at that request's exact shapes: a handful of torch calls each. A
  padded (B, L) block would save those calls, but its reductions would then depend on the longest request in the
  batch. A request must get bitwise the same tokens alone and in a batch, with its prefix cached or not
  (tests/test_prefix_invariance.py), and a padded block broke that on tq-tiny.

Only the slots a batch names are read (never the pool), so the cost follows the batch's tokens, not the pool size.
Requests are grouped so that one group's unpacked K/V stay under `max_elements` floats.
"""

from __future__ import annotations

import torch

from .quantizer import TurboQuantizer
from .reference import _check_attention_args

# Unpacked floats per group of requests (K or V values of one group, rotated domain, fp32): 32M = 128 MB.
MAX_ELEMENTS = 1 << 25


def _attend_one(q, k_parts, v_parts, k_quantizer, v_quantizer, k_t, v_t, sm_scale, logit_cap) -> torch.Tensor:
    """One request: q (Hq, d) over its unpacked K/V parts (storage_decode of (L, Hkv, bytes)) -> (Hq, d) float32."""
    hq, d = q.shape
    k_vals, k_norms, k_signs, k_coef = k_parts
    v_vals, v_norms, v_signs, v_coef = v_parts
    hkv = k_vals.shape[1]
    q_rot, q_qjl = k_quantizer.rotate_query(q.view(hkv, hq // hkv, d))  # (Hkv, G, d)
    scores = torch.einsum("hgd,lhd->hgl", q_rot[..., k_t.storage_perm], k_vals)
    if k_norms is not None:
        scores *= k_norms.T.unsqueeze(1)
    if k_signs is not None:
        scores += torch.einsum("hgd,lhd->hgl", q_qjl[..., k_t.qjl_perm], k_signs) * k_coef.T.unsqueeze(1)
    scores *= sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    probs = torch.softmax(scores, dim=-1)  # (Hkv, G, L)
    weights = probs if v_norms is None else probs * v_norms.T.unsqueeze(1)
    acc = torch.empty(q_rot.shape, dtype=torch.float32, device=q.device)
    acc[..., v_t.storage_perm] = torch.einsum("hgl,lhd->hgd", weights, v_vals)
    acc_qjl = None
    if v_signs is not None:
        acc_qjl = torch.empty_like(acc)
        acc_qjl[..., v_t.qjl_perm] = torch.einsum("hgl,lhd->hgd", probs * v_coef.T.unsqueeze(1), v_signs)
    return v_quantizer.unrotate_output(acc, acc_qjl).reshape(hq, d)


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    *,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """One new token per request: q (B, Hq, d) -> (B, Hq, d) in q.dtype, as reference.decode_attention."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    out = torch.zeros_like(q)
    k_t, v_t = k_quantizer.tensors(q.device), v_quantizer.tensors(q.device)
    bounds = kv_indptr.tolist()
    per_token = k_pool.shape[1] * k_quantizer.layout.head_dim
    first = 0
    while first < q.shape[0]:
        # Consecutive requests whose unpacked K (or V) fit under max_elements; at least one.
        last = first + 1
        while last < q.shape[0] and (bounds[last + 1] - bounds[first]) * per_token <= max_elements:
            last += 1
        lo, hi = bounds[first], bounds[last]
        slots = kv_indices[lo:hi].long()
        k_parts = k_quantizer.storage_decode(k_pool[slots])
        v_parts = v_quantizer.storage_decode(v_pool[slots])
        for b in range(first, last):
            start, end = bounds[b] - lo, bounds[b + 1] - lo
            if end == start:
                continue  # a request with no slots attends to nothing: its output stays zero
            out[b] = _attend_one(
                q[b],
                [None if t is None else t[start:end] for t in k_parts],
                [None if t is None else t[start:end] for t in v_parts],
                k_quantizer,
                v_quantizer,
                k_t,
                v_t,
                sm_scale,
                logit_cap,
            ).to(q.dtype)
        first = last
    return out
