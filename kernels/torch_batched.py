"""Decode and extend attention over the packed pool for a whole batch, in torch: the CPU serving path.

Same semantics as reference.decode_attention / extend_attention (the specification; tests compare them on the same
packed data), different schedule. A CPU step spends its time in unpacking and in per-call overhead, so:

- The slots of a group of requests are gathered and unpacked together, by one table gather per packed byte
  (storage_decode below), into the quantizer's storage basis W: coordinates in the order they are stored,
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
Requests are grouped so that one group's unpacked K/V stay under `max_elements` floats. With a sliding window W
(sliding_window_size, reference.py), a request's slots before its first query's window start are neither gathered
nor decoded; an extend block attends to the keys from its own window start (a function of the block's position
only, so the bitwise invariance above holds), masked per row.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from .layout import Plane, Segment
from .packed import PackedVectors
from .quantizer import TurboQuantizer, blockwise_matmul
from .reference import _check_attention_args, _extend_bounds, window_of

# Unpacked floats per group of requests (K or V values of one group, storage basis, fp32): 32M = 128 MB.
MAX_ELEMENTS = 1 << 25
# Token positions per attention call of an extend (see _attend_new_tokens).
EXTEND_BLOCK = 64


# ------------------------------------------------------------------------------------------------ byte tables
# The CPU torch path's decode: one row gather per packed byte through tables built from the layout and codebooks
# (the quantizer keeps the specification's shift-and-mask decode; these are this path's own).


def plane_table(plane: Plane, values: torch.Tensor | None = None) -> torch.Tensor:
    """(256, per_byte) float32: for each byte value, its per_byte fields in plane order, each shifted to the plane's
    place in the code (field << plane.shift), or mapped through `values` (a codebook) when given.

    Decoding a plane is then one row gather per byte, F.embedding(bytes, table) -> (..., nbytes, per_byte), instead
    of per_byte shift/mask passes over the records and an index into the codebook (the CPU decode's main cost)."""
    byte = torch.arange(256).unsqueeze(1)
    fields = (byte >> (torch.arange(plane.per_byte) * plane.bits)) & ((1 << plane.bits) - 1)
    return (fields << plane.shift).float() if values is None else values.float()[fields]


def _gather_rows(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """F.embedding(index, table): (...,) -> (..., width). A float32 table of width 2 (4-bit planes) is read as one
    float64 word per row, which gathers about 1.5x faster on a CPU than rows of two floats."""
    if table.shape[-1] != 2 or table.dtype != torch.float32:
        return torch.nn.functional.embedding(index, table)
    words = table.contiguous().view(torch.float64).view(-1)
    return words.index_select(0, index.reshape(-1)).view(torch.float32).view(*index.shape, 2)


def _plane_fields(codes: torch.Tensor, plane: Plane, table: torch.Tensor, channel_order: bool = True) -> torch.Tensor:
    """Code rows (..., code_bytes) -> the plane's table entries (..., plane.channels), in channel order, or in
    storage order (byte-major: see _storage_channels), which needs no transposing copy."""
    raw = codes[..., plane.offset : plane.offset + plane.nbytes].long()
    fields = _gather_rows(raw, table)  # (..., nbytes, per_byte)
    if not channel_order:
        return fields.flatten(-2)
    return fields.transpose(-1, -2).reshape(*codes.shape[:-1], plane.channels)


def _storage_channels(plane: Plane) -> torch.Tensor:
    """Channel of each field in byte-major order (byte j, field k -> start + k * nbytes + j): (channels,) long."""
    j, k = torch.meshgrid(torch.arange(plane.nbytes), torch.arange(plane.per_byte), indexing="ij")
    return (plane.start + k * plane.nbytes + j).reshape(-1)


def split_plane_table(segment: Segment, codebook: torch.Tensor) -> torch.Tensor:
    """A 3-bit segment's codes live in two planes, 2 low bits and 1 high bit, whose bytes hold different channels:
    byte j of the low plane (n2 bytes) holds channels j + k * n2 (k = 0..3), and their high bits sit in byte
    j % n1 of the high plane (n1 = n2 / 2 bytes) at bits j // n1 + 2k. So (high byte >> (j // n1)) & 0x55 has them
    at bits 0, 2, 4, 6, and this (256 * 86, 4) float32 table maps low byte | that << 8 to the four centroids of
    byte j: one row gather per low-plane byte decodes the segment, in the low plane's storage order."""
    low, high = segment.planes
    if (low.bits, low.shift, high.bits, high.shift) != (2, 0, 1, 2) or low.nbytes != 2 * high.nbytes:
        raise ValueError(f"not a 3-bit segment of a 2-bit and a 1-bit plane: {segment}")
    index = torch.arange(256 * (0x55 + 1))
    field = torch.arange(4)
    code = ((index.unsqueeze(1) >> 2 * field) & 3) | (((index.unsqueeze(1) >> 8 + 2 * field) & 1) << 2)
    return codebook.float()[code]


def _split_plane_fields(codes: torch.Tensor, segment: Segment, table: torch.Tensor) -> torch.Tensor:
    """A 3-bit segment (see split_plane_table) of code rows -> its centroids (..., channels) in the low plane's
    storage order."""
    low, high = segment.planes
    high_bytes = codes[..., high.offset : high.offset + high.nbytes]
    high_bits = torch.cat([high_bytes, high_bytes >> 1], dim=-1) & 0x55  # (..., low.nbytes)
    index = codes[..., low.offset : low.offset + low.nbytes].long() | (high_bits.long() << 8)
    return torch.nn.functional.embedding(index, table).flatten(-2)


@dataclass(frozen=True)
class CpuTables:
    """A quantizer's byte tables and storage basis on one device (cpu_tables)."""

    # Per segment, per plane: plane_table of the plane; a one-plane segment's table holds centroids, not codes.
    plane_tables: tuple[tuple[torch.Tensor, ...], ...]
    qjl_table: torch.Tensor | None  # plane_table of the QJL sign plane mapping bits to -1/+1 (prod only)
    split_tables: tuple[torch.Tensor | None, ...]  # per segment: split_plane_table of a 3-bit one, else None
    storage_basis: torch.Tensor  # (E, d) W of storage_decode: its (..., E) rows times W give x~


@cache
def cpu_tables(quantizer: TurboQuantizer, device: torch.device | str = "cpu") -> CpuTables:
    """The byte tables and storage basis W (E, d) of `quantizer` on `device`, built once: W's rows are the rows of R
    in storage order, then for prod the rows of S R in the order of the sign plane (raw layouts: W = I)."""
    lay, t = quantizer.layout, quantizer.tensors("cpu")
    order = [_storage_channels(seg.planes[0]) for seg in lay.segments]
    basis = t.rotation[torch.cat(order)] if order else t.rotation  # raw, and 1-bit prod's zero values: no order
    if t.qjl is not None:
        basis = torch.cat([basis, (t.qjl @ t.rotation)[_storage_channels(quantizer.qjl_plane)]])
    tables = CpuTables(
        plane_tables=tuple(
            tuple(plane_table(p, cb if len(seg.planes) == 1 else None) for p in seg.planes)
            for seg, cb in zip(lay.segments, t.centroids, strict=True)
        ),
        qjl_table=plane_table(quantizer.qjl_plane, torch.tensor([-1.0, 1.0])) if lay.variant == "prod" else None,
        split_tables=tuple(
            split_plane_table(seg, cb) if len(seg.planes) == 2 else None
            for seg, cb in zip(lay.segments, t.centroids, strict=True)
        ),
        storage_basis=basis.contiguous(),
    )
    return CpuTables(
        plane_tables=tuple(tuple(x.to(device) for x in ts) for ts in tables.plane_tables),
        qjl_table=None if tables.qjl_table is None else tables.qjl_table.to(device),
        split_tables=tuple(None if x is None else x.to(device) for x in tables.split_tables),
        storage_basis=tables.storage_basis.to(device),
    )


def storage_decode(quantizer: TurboQuantizer, packed: PackedVectors) -> torch.Tensor:
    """Packed vectors (...) -> y (..., E) float32 in the storage basis W = cpu_tables(quantizer).storage_basis
    (E, d), so that x~ = y @ W: <q, x~> = (q @ W.T) . y and sum_i p_i x~_i = (sum_i p_i y_i) @ W.

    mse: y = n * c[idx] with the coordinates in the order they are stored (E = d); prod: then
    n * gamma * qjl_scale * s, the QJL signs in the order of their plane (E = 2d); raw: the vector (W = I).
    One row gather per packed byte and no transposes; the query and the output are turned into and out of this
    basis once per query, by one matmul each."""
    lay = quantizer.layout
    packed.check("packed vectors", lay)
    if lay.is_raw:
        return packed.codes.contiguous().view(torch.bfloat16).float()
    t = cpu_tables(quantizer, packed.device)
    codes = packed.codes
    parts = []
    for seg, tables, split in zip(lay.segments, t.plane_tables, t.split_tables, strict=True):
        if len(seg.planes) == 1:  # the table maps bytes straight to centroids
            parts.append(_plane_fields(codes, seg.planes[0], tables[0], channel_order=False))
        else:
            parts.append(_split_plane_fields(codes, seg, split))
    if parts:
        values = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    else:  # 1-bit prod: QJL signs only, no codes
        values = torch.zeros(*packed.shape, lay.head_dim, device=packed.device)
    norms = quantizer.norms(packed).unsqueeze(-1)
    values *= norms
    if lay.variant != "prod":
        return values
    signs = _plane_fields(codes, quantizer.qjl_plane, t.qjl_table, channel_order=False)
    signs *= norms * quantizer.residual_norms(packed).unsqueeze(-1) * quantizer.qjl_scale
    return torch.cat([values, signs], dim=-1)


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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    logit_cap: float,
    visible: torch.Tensor | None,
) -> torch.Tensor:
    """Query rows q (Lq, Hq, E_k) over keys k (Lk, Hkv, E_k) and values v (Lk, Hkv, E_v), all in the storage
    bases -> (Lq, Hq, E_v) float32. Row i sees the keys j with visible[i, j] (Lq, Lk), or all of them if None."""
    lq, hq = q.shape[:2]
    lk, hkv = k.shape[:2]
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
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    sm_scale: float,
    logit_cap: float,
    block: int,
    n_kv: int,
    window: int | None = None,
) -> torch.Tensor:
    """One request of n_kv positions: its new tokens' queries (N, Hq, E_k), the keys/values of its last positions
    (L, Hkv, E), from position n_kv - L on (all of them, or from the first new token's window start) -> (N, Hq, E_v).

    In blocks of `block` token positions aligned to position 0, each attending to the keys from the block's window
    start (max(0, start - W), or 0) to the block's end, with zero queries (and masked zero keys: past the last token,
    and before the keys given) padding it to full size: a token's output is then computed by the same call on the
    same operands whether its prefix came from the radix cache or was computed in this extend, and however long the
    request that wrote that prefix was (bitwise)."""
    n_new, key_base = queries.shape[0], n_kv - keys.shape[0]
    first = n_kv - n_new  # position of the first new token
    out = torch.empty(n_new, queries.shape[1], values.shape[-1], dtype=torch.float32, device=queries.device)
    for start in range(first // block * block, n_kv, block):
        lo, hi = max(start, first), min(start + block, n_kv)
        padded = queries.new_zeros(block, *queries.shape[1:])
        padded[lo - start : hi - start] = queries[lo - first : hi - first]
        k_start = 0 if window is None else max(0, start - window)
        given = max(k_start, key_base)  # keys below it are outside every real row's window: never read
        k, v = keys[given - key_base : hi - key_base], values[given - key_base : hi - key_base]
        if given > k_start or hi < start + block:
            k, v = (
                torch.cat(
                    [t.new_zeros(given - k_start, *t.shape[1:]), t, t.new_zeros(start + block - hi, *t.shape[1:])]
                )
                for t in (k, v)
            )
        diagonal = start - k_start  # row r (position start + r) sees key c (position k_start + c) iff c <= r + this
        visible = torch.ones(block, start + block - k_start, dtype=torch.bool, device=queries.device).tril(diagonal)
        if window is not None:
            visible = visible.triu(diagonal - window)
        rows = _attend_one(padded, k, v, sm_scale, logit_cap, visible)
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
    window: int | None = None,
) -> torch.Tensor:
    """Query rows rows[b] : rows[b+1] of request b, its last tokens, over its slots kv_indices[bounds[b] :
    bounds[b+1]] -> (rows[-1], Hq, d) in q.dtype; a request without slots or rows gets zeros. block None: one
    query row per request, seeing all its slots (decode); else causal, in blocks (_attend_new_tokens). A window W
    skips each request's slots before its first query's window start: they are never gathered nor decoded."""
    k_basis = cpu_tables(k_quantizer, q.device).storage_basis
    v_basis = cpu_tables(v_quantizer, q.device).storage_basis
    queries = blockwise_matmul(q.float(), k_basis.T)  # (T, Hq, E_k), each token's rows alone
    acc = torch.zeros(*q.shape[:2], v_basis.shape[0], dtype=torch.float32, device=q.device)
    per_token = k_pool.shape[1] * max(k_basis.shape[0], v_basis.shape[0])
    num_requests = len(bounds) - 1
    # starts[b]: request b's first slot read (its first query's window start, or its first slot)
    starts = bounds[:-1]
    if window is not None:
        starts = [
            bounds[b] + max(0, bounds[b + 1] - bounds[b] - (rows[b + 1] - rows[b]) - window)
            for b in range(num_requests)
        ]
    first = 0
    while first < num_requests:
        # Consecutive requests whose unpacked K (or V) fit under max_elements; at least one.
        last, size = first + 1, bounds[first + 1] - starts[first]
        while last < num_requests and (size + bounds[last + 1] - starts[last]) * per_token <= max_elements:
            size += bounds[last + 1] - starts[last]
            last += 1
        if window is None:
            slots = kv_indices[bounds[first] : bounds[last]].long()
        else:
            slots = torch.cat([kv_indices[starts[b] : bounds[b + 1]] for b in range(first, last)]).long()
        keys = storage_decode(k_quantizer, k_pool.index_select(slots))
        values = storage_decode(v_quantizer, v_pool.index_select(slots))
        with _one_thread(q.device) if block is None else nullcontext():
            end = 0
            for b in range(first, last):
                start, end = end, end + bounds[b + 1] - starts[b]
                if end == start or rows[b + 1] == rows[b]:
                    continue  # a request with no slots attends to nothing: its output stays zero
                k, v = keys[start:end], values[start:end]
                if block is None:
                    acc[rows[b] : rows[b + 1]] = _attend_one(
                        queries[rows[b] : rows[b + 1]], k, v, sm_scale, logit_cap, None
                    )
                else:
                    acc[rows[b] : rows[b + 1]] = _attend_new_tokens(
                        queries[rows[b] : rows[b + 1]], k, v, sm_scale, logit_cap, block,
                        bounds[b + 1] - bounds[b], window,
                    )  # fmt: skip
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
    sliding_window_size: int | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """One new token per request: q (B, Hq, d) -> (B, Hq, d) in q.dtype, as reference.decode_attention."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    rows, bounds = list(range(q.shape[0] + 1)), kv_indptr.tolist()
    args = (k_quantizer, v_quantizer, sm_scale, logit_cap, max_elements, None, window_of(sliding_window_size))
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
    sliding_window_size: int | None = None,
    max_elements: int = MAX_ELEMENTS,
    block: int = EXTEND_BLOCK,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves: q (T, Hq, d) -> (T, Hq, d) in q.dtype, as
    reference.extend_attention (max_new_tokens, the Triton kernel's grid hint, is not needed here)."""
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    rows, bounds = _extend_bounds(q, qo_indptr, kv_indptr)
    args = (k_quantizer, v_quantizer, sm_scale, logit_cap, max_elements, block, window_of(sliding_window_size))
    return _attend_requests(q, k_pool, v_pool, rows, bounds, kv_indices, *args)
