"""Decode and extend attention over the packed pool for a whole batch, in torch: the CPU serving path.

Same semantics as reference.decode_attention / extend_attention (the specification; tests compare them on the same
packed data), different schedule. A CPU step spends its time in unpacking and in per-call overhead, so:

- The slots of a group of requests are gathered and unpacked together, by one table gather per packed byte
  (TurboQuantizer.storage_decode), into the quantizer's storage basis W: coordinates in the order they are stored,
  norms applied. Unpacking is element-wise, so it gives each record the same values whatever the batch.
- The queries enter that basis and the outputs leave it by one batched matmul each (q @ W_k.T, acc @ W_v), which
  replaces the rotation, the coordinate reordering and, for prod, the QJL projection. These are bmm's of one
  (Hq, d) block per token, so each token's rows are computed alone (a flat matmul rounds by its row count).
- The attention itself runs request by request, at shapes that depend only on the request: one fused
  scaled_dot_product_attention call per decode request (a few calls with tanh logit capping), as SGLang's
  torch_native backend does for bf16; an extend in blocks of EXTEND_BLOCK positions (_attend_new_tokens). A padded
  (B, L) block would save calls, but its reductions would then depend on the longest request in the batch. A
  request must get bitwise the same tokens alone and in a batch, with its prefix cached or not
  (tests/test_prefix_invariance.py), and a padded block broke that on tq-tiny. Unit tests check all of this bitwise.

Only the slots a batch names are read (never the pool), so the cost follows the batch's tokens, not the pool size.
Requests are grouped so that one group's unpacked K/V stay under `max_elements` floats.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .packed import PackedVectors
from .quantizer import TurboQuantizer, blockwise_matmul
from .reference import _check_attention_args, _extend_bounds

# Unpacked floats per group of requests (K or V values of one group, storage basis, fp32): 32M = 128 MB.
MAX_ELEMENTS = 1 << 25
# Token positions per attention call of an extend (see _attend_new_tokens).
EXTEND_BLOCK = 64


@contextmanager
def _one_thread(device: torch.device):
    """torch on one thread within. A decode step's per-request calls are each a few microseconds of work; with more
    threads every call is a parallel region whose barrier waits for a core that the server's other processes
    (tokenizer, HTTP) may hold, which made each call 2.5-5x slower on a 2-core machine with the other core busy (as
    fast when idle). The results do not depend on it: the calls split their work by head, never within a reduction
    (a test runs both)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float, offset: int | None
) -> torch.Tensor:
    """Query rows q (Lq, Hq, E_k) over keys k (Lk, Hkv, E_k) and values v (Lk, Hkv, E_v), all in the storage
    bases -> (Lq, Hq, E_v) float32. Row i sees the keys j <= offset + i (causal), or all of them if offset is None."""
    lq, hq = q.shape[:2]
    lk, hkv = k.shape[:2]
    visible = None if offset is None else torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(offset)
    if logit_cap <= 0:
        out = F.scaled_dot_product_attention(
            q.permute(1, 0, 2).unsqueeze(0),
            k.permute(1, 0, 2).unsqueeze(0),
            v.permute(1, 0, 2).unsqueeze(0),
            attn_mask=visible,
            scale=sm_scale,
            enable_gqa=hkv != hq,
        )  # (1, Hq, Lq, E_v)
        return out[0].permute(1, 0, 2)
    group = hq // hkv
    scores = torch.matmul(q.view(lq, hkv, group, -1).permute(1, 2, 0, 3), k.permute(1, 2, 0).unsqueeze(1))
    scores = logit_cap * torch.tanh(scores * (sm_scale / logit_cap))  # (Hkv, G, Lq, Lk)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.permute(1, 0, 2).unsqueeze(1))  # (Hkv, G, Lq, E_v)
    return out.permute(2, 0, 1, 3).reshape(lq, hq, -1)


def _attend_new_tokens(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sm_scale: float, logit_cap: float, block: int
) -> torch.Tensor:
    """One request's new tokens: queries (N, Hq, E_k), the last N of its keys/values (L, Hkv, E) -> (N, Hq, E_v).

    In blocks of `block` token positions aligned to position 0, each attending to the keys up to the block's end,
    with zero queries (and, past the last token, masked zero keys) padding it to full size: a token's output is then
    computed by the same call on the same operands whether its prefix came from the radix cache or was computed in
    this extend, and however long the request that wrote that prefix was (bitwise)."""
    n_new, n_kv = queries.shape[0], keys.shape[0]
    first = n_kv - n_new  # position of the first new token
    out = torch.empty(n_new, queries.shape[1], values.shape[-1], dtype=torch.float32, device=queries.device)
    for start in range(first // block * block, n_kv, block):
        lo, hi = max(start, first), min(start + block, n_kv)
        padded = queries.new_zeros(block, *queries.shape[1:])
        padded[lo - start : hi - start] = queries[lo - first : hi - first]
        k, v = keys[:hi], values[:hi]
        if hi < start + block:  # the last block: pad the keys too
            k, v = (torch.cat([t, t.new_zeros(start + block - hi, *t.shape[1:])]) for t in (k, v))
        rows = _attend_one(padded, k, v, sm_scale, logit_cap, offset=start)
        out[lo - first : hi - first] = rows[lo - start : hi - start]
    return out


def _attend_requests(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    rows: list[int],
    bounds: list[int],
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float,
    max_elements: int,
    block: int | None,
) -> torch.Tensor:
    """Query rows rows[b] : rows[b+1] of request b, its last tokens, over its slots kv_indices[bounds[b] :
    bounds[b+1]] -> (rows[-1], Hq, d) in q.dtype; a request without slots or rows gets zeros. block None: one
    query row per request, seeing all its slots (decode); else causal, in blocks (_attend_new_tokens)."""
    k_basis = k_quantizer.tensors(q.device).storage_basis
    v_basis = v_quantizer.tensors(q.device).storage_basis
    queries = blockwise_matmul(q.float(), k_basis.T)  # (T, Hq, E_k), each token's rows alone
    acc = torch.zeros(*q.shape[:2], v_basis.shape[0], dtype=torch.float32, device=q.device)
    per_token = k_pool.shape[1] * max(k_basis.shape[0], v_basis.shape[0])
    num_requests = len(bounds) - 1
    first = 0
    while first < num_requests:
        # Consecutive requests whose unpacked K (or V) fit under max_elements; at least one.
        last = first + 1
        while last < num_requests and (bounds[last + 1] - bounds[first]) * per_token <= max_elements:
            last += 1
        lo, hi = bounds[first], bounds[last]
        slots = kv_indices[lo:hi].long()
        keys = k_quantizer.storage_decode(k_pool.index_select(slots))
        values = v_quantizer.storage_decode(v_pool.index_select(slots))
        with _one_thread(q.device) if block is None else nullcontext():
            for b in range(first, last):
                start, end = bounds[b] - lo, bounds[b + 1] - lo
                if end == start or rows[b + 1] == rows[b]:
                    continue  # a request with no slots attends to nothing: its output stays zero
                k, v = keys[start:end], values[start:end]
                if block is None:
                    acc[rows[b] : rows[b + 1]] = _attend_one(
                        queries[rows[b] : rows[b + 1]], k, v, sm_scale, logit_cap, None
                    )
                else:
                    acc[rows[b] : rows[b + 1]] = _attend_new_tokens(
                        queries[rows[b] : rows[b + 1]], k, v, sm_scale, logit_cap, block
                    )
        first = last
    return blockwise_matmul(acc, v_basis).to(q.dtype)


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
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """One new token per request: q (B, Hq, d) -> (B, Hq, d) in q.dtype, as reference.decode_attention."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    rows, bounds = list(range(q.shape[0] + 1)), kv_indptr.tolist()
    args = (k_quantizer, v_quantizer, sm_scale, logit_cap, max_elements, None)
    return _attend_requests(q, k_pool, v_pool, rows, bounds, kv_indices, *args)


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
    max_new_tokens: int | None = None,
    *,
    max_elements: int = MAX_ELEMENTS,
    block: int = EXTEND_BLOCK,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves: q (T, Hq, d) -> (T, Hq, d) in q.dtype, as
    reference.extend_attention (max_new_tokens, the Triton kernel's grid hint, is not needed here)."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    rows, bounds = _extend_bounds(q, qo_indptr, kv_indptr)
    args = (k_quantizer, v_quantizer, sm_scale, logit_cap, max_elements, block)
    return _attend_requests(q, k_pool, v_pool, rows, bounds, kv_indices, *args)
