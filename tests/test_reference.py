"""Reference attention on the packed pool: rotated-domain math equals dequantize-then-attend, batching, causality."""

import math

import pytest
import torch
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer
from tq_serve.kernels.reference import attend_packed, decode_attention, extend_attention, packed_scores, write_kv


def dense_attention(q, k, v, sm_scale, logit_cap=0.0, causal_offset=None):
    """Plain float64 attention over dequantized K/V: (Lq, Hq, d) x (Lk, Hkv, d)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    if causal_offset is not None:
        lq, lk = q.shape[0], k.shape[0]
        s = s.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + causal_offset, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.double())


CASES = [(128, 4, "mse"), (128, 3, "prod"), (64, 2, "mse"), (80, 2.5, "mse"), (128, 16, "mse")]


@pytest.mark.parametrize(("head_dim", "bits", "variant"), CASES)
def test_rotated_domain_scores_and_outputs_equal_dequantize_then_attend(head_dim, bits, variant):
    gen = torch.Generator().manual_seed(0)
    kq = get_quantizer(VectorLayout(head_dim=head_dim, bits=bits, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=head_dim, bits=max(2, bits - 1) if bits != 16 else 16, variant=variant))
    q, k, v = (torch.randn(n, h, head_dim, generator=gen) for n, h in ((5, 4), (37, 2), (37, 2)))
    kp, vp = kq.quantize(k), vq.quantize(v)
    k_hat, v_hat = kq.dequantize(kp), vq.dequantize(vp)
    scores = packed_scores(q[:, :2], kp, kq)
    torch.testing.assert_close(scores, torch.einsum("qhd,khd->hqk", q[:, :2], k_hat), rtol=1e-4, atol=1e-4)
    scale = 1 / math.sqrt(head_dim)
    for cap, offset in ((0.0, None), (5.0, 32)):
        out = attend_packed(q, kp, vp, kq, vq, scale, logit_cap=cap, causal_offset=offset)
        ref = dense_attention(q, k_hat, v_hat, scale, logit_cap=cap, causal_offset=offset)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("group", "variant"), [(1, "mse"), (4, "prod"), (8, "mse")])
def test_decode_and_extend_read_only_their_slots_and_match_per_request_attention(group, variant, poisoned_pool):
    gen = torch.Generator().manual_seed(1)
    d, hkv = 64, 2
    kq = get_quantizer(VectorLayout(head_dim=d, bits=4, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=d, bits=3, variant=variant))
    k_pool, v_pool = poisoned_pool(200, hkv, kq), poisoned_pool(200, hkv, vq)
    lens = [1, 17, 40]
    slots = torch.randperm(200, generator=gen)[: sum(lens)]
    k, v = torch.randn(sum(lens), hkv, d, generator=gen), torch.randn(sum(lens), hkv, d, generator=gen)
    write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    kv_indptr = torch.tensor([0, 1, 18, 58])
    q = torch.randn(3, hkv * group, d, generator=gen)
    out = decode_attention(q, k_pool, v_pool, kv_indptr, slots, kq, vq, 0.125)
    assert torch.isfinite(out).all()
    for b in range(3):
        s = slots[kv_indptr[b] : kv_indptr[b + 1]]
        expected = attend_packed(q[b : b + 1], k_pool.index_select(s), v_pool.index_select(s), kq, vq, 0.125)[0]
        torch.testing.assert_close(out[b], expected)
    # Extend: the last 1, 5 and 40 tokens of each request are new (all of the third: no prefix).
    qo_indptr = torch.tensor([0, 1, 6, 46])
    qx = torch.randn(46, hkv * group, d, generator=gen)
    out = extend_attention(qx, k_pool, v_pool, qo_indptr, kv_indptr, slots, kq, vq, 0.125)
    assert torch.isfinite(out).all()
    k_req, v_req = k_pool.index_select(slots[1:18]), v_pool.index_select(slots[1:18])
    expected = attend_packed(qx[1:6], k_req, v_req, kq, vq, 0.125, causal_offset=12)
    torch.testing.assert_close(out[1:6], expected)
    # The last new token of a request sees everything; the first sees only its prefix and itself.
    full = attend_packed(qx[5:6], k_req, v_req, kq, vq, 0.125)
    torch.testing.assert_close(out[5:6], full)


def test_extend_then_decode_equals_one_longer_extend(poisoned_pool):
    """Prefix-cache invariance at the math level: K/V come from the pool, so chunking a prompt changes nothing."""
    gen = torch.Generator().manual_seed(2)
    kq = vq = get_quantizer(VectorLayout(head_dim=128, bits=3))
    k_pool, v_pool = poisoned_pool(64, 1, kq), poisoned_pool(64, 1, vq)
    k, v, q = (torch.randn(20, n, 128, generator=gen) for n in (1, 1, 4))
    slots = torch.arange(20) * 3
    write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    one_shot = extend_attention(q, k_pool, v_pool, torch.tensor([0, 20]), torch.tensor([0, 20]), slots, kq, vq, 0.1)
    tail = extend_attention(q[12:], k_pool, v_pool, torch.tensor([0, 8]), torch.tensor([0, 20]), slots, kq, vq, 0.1)
    torch.testing.assert_close(tail, one_shot[12:])
    last = decode_attention(q[19:], k_pool, v_pool, torch.tensor([0, 20]), slots, kq, vq, 0.1)
    torch.testing.assert_close(last, one_shot[19:])


def test_bad_input_is_rejected_with_the_reason():
    kq = get_quantizer(VectorLayout(head_dim=64, bits=4))
    pool = PackedVectors.empty(kq.layout, (10, 2))
    q = torch.randn(1, 4, 64)
    with pytest.raises(IndexError, match="kv_indices holds slots in \\[0, 10\\] but the pool has 10 slots"):
        decode_attention(q, pool, pool, torch.tensor([0, 2]), torch.tensor([0, 10]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="k_pool: expected codes uint8 \\(slots, kv_heads, 32\\) and norms float16"):
        short = PackedVectors(pool.codes[..., :30], pool.norms)
        decode_attention(q, short, pool, torch.tensor([0, 1]), torch.tensor([0]), kq, kq, 0.1)
    with pytest.raises(TypeError, match="v_pool: expected PackedVectors"):
        decode_attention(q, pool, pool.codes, torch.tensor([0, 1]), torch.tensor([0]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="query heads \\(3\\) must be a multiple"):
        decode_attention(torch.randn(1, 3, 64), pool, pool, torch.tensor([0, 1]), torch.tensor([0]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="must both be \\(tokens, 2, head_dim\\)"):
        write_kv(pool, pool, torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([1, 2]), kq, kq)
