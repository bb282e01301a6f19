"""Decode attention over the packed pool for a whole batch at once, in torch: the CPU serving path.

Same semantics as reference.decode_attention (the specification; tests compare the two on the same packed data),
different schedule. The reference attends request by request, so a decode step of B requests costs B times a few
dozen small torch calls per layer, and on a CPU that per-call overhead, not arithmetic, is the decode time. Here the
requests of a batch go through each step together: their slots are gathered into one padded (B, L) block (L = the
longest of them), unpacked once, scored with one batched matmul, masked, soft-maxed and summed with another.
Unpacking is one table gather per packed byte (TurboQuantizer.storage_decode), leaving the coordinates in the order
they are stored; the query is permuted to that order instead, and the norms scale the (B, L) scores and
probabilities rather than the (B, L, d) vectors.

Only the slots a batch names are read (never the pool), so the cost follows the batch's tokens, not the pool size.
Padding costs B x L instead of the sum of lengths; requests are grouped, longest first, so that one group's padded
block stays under `max_elements` floats and a long request does not inflate a batch of short ones.
"""

from __future__ import annotations

import torch

from .quantizer import TurboQuantizer
from .reference import _check_attention_args

# Padded floats per group of requests (K and V values of one group, rotated domain, fp32): 32M = 128 MB.
MAX_ELEMENTS = 1 << 25


def _attend_group(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float,
) -> torch.Tensor:
    """q (b, Hq, d) of requests whose slots are kv_indices[starts[i] : starts[i] + lens[i]], all lens >= 1."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    group = hq // hkv
    width = int(lens.max())
    pos = torch.arange(width, device=q.device)
    valid = pos.unsqueeze(0) < lens.unsqueeze(1)  # (b, L)
    # Padding positions read the request's first slot (always valid) and are masked out of the softmax.
    where = torch.where(valid, starts.unsqueeze(1) + pos.unsqueeze(0), starts.unsqueeze(1))
    slots = kv_indices[where].long()  # (b, L)

    k_t, v_t = k_quantizer.tensors(q.device), v_quantizer.tensors(q.device)
    q_rot, q_qjl = k_quantizer.rotate_query(q.view(b, hkv, group, d))  # (b, Hkv, G, d)
    # Packed coordinates stay in storage order; the query is permuted to it instead (d values, not L x d).
    k_vals, k_norms, k_signs, k_coef = k_quantizer.storage_decode(k_pool[slots])  # (b, L, Hkv, d), (b, L, Hkv)
    scores = torch.einsum("bhgd,blhd->bhgl", q_rot[..., k_t.storage_perm], k_vals)
    if k_norms is not None:
        scores *= k_norms.permute(0, 2, 1).unsqueeze(2)
    if k_signs is not None:
        qjl = torch.einsum("bhgd,blhd->bhgl", q_qjl[..., k_t.qjl_perm], k_signs)
        scores += qjl * k_coef.permute(0, 2, 1).unsqueeze(2)
    scores *= sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    scores = scores.masked_fill(~valid.view(b, 1, 1, width), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (b, Hkv, G, L)
    v_vals, v_norms, v_signs, v_coef = v_quantizer.storage_decode(v_pool[slots])
    weights = probs if v_norms is None else probs * v_norms.permute(0, 2, 1).unsqueeze(2)
    acc = torch.empty(b, hkv, group, d, dtype=torch.float32, device=q.device)
    acc[..., v_t.storage_perm] = torch.einsum("bhgl,blhd->bhgd", weights, v_vals)
    acc_qjl = None
    if v_signs is not None:
        acc_qjl = torch.empty_like(acc)
        acc_qjl[..., v_t.qjl_perm] = torch.einsum(
            "bhgl,blhd->bhgd", probs * v_coef.permute(0, 2, 1).unsqueeze(2), v_signs
        )
    return v_quantizer.unrotate_output(acc, acc_qjl).reshape(b, hq, d)


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
    lens = kv_indptr[1:] - kv_indptr[:-1]
    order = torch.argsort(lens, descending=True, stable=True)
    order = order[lens[order] > 0]  # a request with no slots attends to nothing: its output stays zero
    sorted_lens = lens[order].tolist()
    per_token = k_pool.shape[1] * k_quantizer.layout.head_dim
    i = 0
    while i < len(sorted_lens):
        # The longest request left sets the group's width; take as many as fit under max_elements (at least one).
        take = max(1, min(len(sorted_lens) - i, max_elements // max(1, sorted_lens[i] * per_token)))
        rows = order[i : i + take]
        out[rows] = _attend_group(
            q[rows],
            k_pool,
            v_pool,
            kv_indptr[rows],
            lens[rows],
            kv_indices,
            k_quantizer,
            v_quantizer,
            sm_scale,
            logit_cap,
        ).to(q.dtype)
        i += take
    return out
