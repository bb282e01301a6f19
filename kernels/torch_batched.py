"""Decode attention over the packed pool for a whole batch, in torch: the CPU serving path.

Same semantics as reference.decode_attention (the specification; tests compare the two on the same packed data),
different schedule. A CPU decode step spends its time in unpacking and in per-call overhead, so:

- The slots of a group of requests are gathered and unpacked together, by one table gather per packed byte
  (TurboQuantizer.storage_decode), into the quantizer's storage basis W: coordinates in the order they are stored,
  norms applied. Unpacking is element-wise, so it gives each record the same values whatever the batch.
- The queries enter that basis and the outputs leave it by one batched matmul each (q @ W_k.T, acc @ W_v), which
  replaces the rotation, the coordinate reordering and, for prod, the QJL projection.
- The attention itself runs request by request, at that request's exact shapes: one fused
  scaled_dot_product_attention call each (a few calls with tanh logit capping), as SGLang's torch_native backend
  does for bf16. A padded (B, L) block would save those calls, but its reductions would then depend on the longest
  request in the batch. A request must get bitwise the same tokens alone and in a batch, with its prefix cached or
  not (tests/test_prefix_invariance.py), and a padded block broke that on tq-tiny. The batched matmuls are bmm's of
  one (Hq, d) block per request, so each request's rows are computed alone there too (tests check this bitwise).

Only the slots a batch names are read (never the pool), so the cost follows the batch's tokens, not the pool size.
Requests are grouped so that one group's unpacked K/V stay under `max_elements` floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantizer import TurboQuantizer
from .reference import _check_attention_args

# Unpacked floats per group of requests (K or V values of one group, storage basis, fp32): 32M = 128 MB.
MAX_ELEMENTS = 1 << 25


def _per_request_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, m, k) @ w (k, n) -> (B, m, n) float32 as a bmm of B separate (m, k) blocks: one request's rows come out
    bitwise the same whatever the batch (a (B*m, k) matmul picks its kernel by B*m, and the results then differ)."""
    return torch.bmm(x, w.expand(x.shape[0], *w.shape))


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float) -> torch.Tensor:
    """One request: q (Hq, E_k) over its keys k (L, Hkv, E_k) and values v (L, Hkv, E_v), all in the storage bases
    -> (Hq, E_v) float32."""
    hq = q.shape[0]
    hkv = k.shape[1]
    if logit_cap <= 0:
        out = F.scaled_dot_product_attention(
            q.view(1, hq, 1, -1),
            k.permute(1, 0, 2).unsqueeze(0),
            v.permute(1, 0, 2).unsqueeze(0),
            scale=sm_scale,
            enable_gqa=hkv != hq,
        )
        return out.view(hq, -1)
    scores = torch.matmul(q.view(hkv, hq // hkv, -1), k.permute(1, 2, 0)) * sm_scale  # (Hkv, G, L)
    scores = logit_cap * torch.tanh(scores / logit_cap)
    return torch.matmul(torch.softmax(scores, dim=-1), v.permute(1, 0, 2)).view(hq, -1)


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
    k_basis = k_quantizer.tensors(q.device).storage_basis
    v_basis = v_quantizer.tensors(q.device).storage_basis
    queries = _per_request_matmul(q.float(), k_basis.T)  # (B, Hq, E_k)
    acc = torch.zeros(*q.shape[:2], v_basis.shape[0], dtype=torch.float32, device=q.device)
    bounds = kv_indptr.tolist()
    per_token = k_pool.shape[1] * max(k_basis.shape[0], v_basis.shape[0])
    first = 0
    while first < q.shape[0]:
        # Consecutive requests whose unpacked K (or V) fit under max_elements; at least one.
        last = first + 1
        while last < q.shape[0] and (bounds[last + 1] - bounds[first]) * per_token <= max_elements:
            last += 1
        lo, hi = bounds[first], bounds[last]
        slots = kv_indices[lo:hi].long()
        # index_select rather than k_pool[slots]: the same rows, copied ~10x faster on a CPU
        keys = k_quantizer.storage_decode(k_pool.index_select(0, slots))
        values = v_quantizer.storage_decode(v_pool.index_select(0, slots))
        for b in range(first, last):
            start, end = bounds[b] - lo, bounds[b + 1] - lo
            if end == start:
                continue  # a request with no slots attends to nothing: its output stays zero
            acc[b] = _attend_one(queries[b], keys[start:end], values[start:end], sm_scale, logit_cap)
        first = last
    return _per_request_matmul(acc, v_basis).to(q.dtype)
