"""The batched CPU decode (kernels/torch_batched.py) equals the per-request reference on the same packed data."""

import math

import pytest
import torch
from tq_serve.kernels import reference, torch_batched
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.quantizer import get_quantizer


@pytest.mark.parametrize(
    ("head_dim", "k_bits", "v_bits", "variant", "group", "cap"),
    [(128, 4, 3, "mse", 4, 0.0), (64, 3, 2, "prod", 1, 0.0), (128, 2.5, 16, "mse", 8, 30.0), (80, 3.5, 4, "mse", 2, 0)],
)
@pytest.mark.parametrize("max_elements", [torch_batched.MAX_ELEMENTS, 1])
def test_batched_decode_equals_reference(head_dim, k_bits, v_bits, variant, group, cap, max_elements, poisoned_pool):
    gen = torch.Generator().manual_seed(3)
    hkv, slots_total = 2, 400
    kq = get_quantizer(VectorLayout(head_dim=head_dim, bits=k_bits, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=head_dim, bits=v_bits, variant=variant))
    k_pool, v_pool = poisoned_pool(slots_total, hkv, kq), poisoned_pool(slots_total, hkv, vq)
    lens = [17, 0, 1, 150, 33, 1]  # mixed, an empty request, single-token contexts
    slots = torch.randperm(slots_total, generator=gen)[: sum(lens)]
    reference.write_kv(
        k_pool,
        v_pool,
        torch.randn(len(slots), hkv, head_dim, generator=gen),
        torch.randn(len(slots), hkv, head_dim, generator=gen),
        slots,
        kq,
        vq,
    )
    kv_indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    kv_indices = torch.cat([slots, torch.full((5,), slots_total - 1)])  # trailing entries past kv_indptr[-1]
    q = torch.randn(len(lens), hkv * group, head_dim, generator=gen).to(torch.bfloat16)
    args = (q, k_pool, v_pool, kv_indptr, kv_indices, kq, vq, 1 / math.sqrt(head_dim), cap)
    out = torch_batched.decode_attention(*args, max_elements=max_elements)
    expected = reference.decode_attention(*args)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    assert (out[1] == 0).all()  # the empty request
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)  # bf16 output rounding
    q32 = q.float()
    out32 = torch_batched.decode_attention(q32, *args[1:], max_elements=max_elements)
    torch.testing.assert_close(out32, reference.decode_attention(q32, *args[1:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("head_dim", "k_bits", "v_bits", "variant", "group", "cap"),
    [(128, 4, 3, "mse", 2, 0.0), (64, 3, 2, "prod", 1, 0.0), (128, 2.5, 16, "mse", 4, 30.0)],
)
@pytest.mark.parametrize(("max_elements", "block"), [(torch_batched.MAX_ELEMENTS, torch_batched.EXTEND_BLOCK), (1, 7)])
def test_batched_extend_equals_reference(
    head_dim, k_bits, v_bits, variant, group, cap, max_elements, block, poisoned_pool
):
    """Prefill and prefix-cache extends: (cached prefix, new tokens) per request, queries causal over both."""
    gen = torch.Generator().manual_seed(4)
    hkv, slots_total = 2, 500
    kq = get_quantizer(VectorLayout(head_dim=head_dim, bits=k_bits, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=head_dim, bits=v_bits, variant=variant))
    k_pool, v_pool = poisoned_pool(slots_total, hkv, kq), poisoned_pool(slots_total, hkv, vq)
    prefix_new = [(0, 17), (30, 0), (0, 0), (5, 1), (100, 40), (1, 3)]
    lens = [p + n for p, n in prefix_new]
    slots = torch.randperm(slots_total, generator=gen)[: sum(lens)]
    k, v = (torch.randn(len(slots), hkv, head_dim, generator=gen) for _ in range(2))
    reference.write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    kv_indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    qo_indptr = torch.tensor([0, *torch.tensor([n for _, n in prefix_new]).cumsum(0).tolist()])
    q = torch.randn(int(qo_indptr[-1]), hkv * group, head_dim, generator=gen)
    args = (q, k_pool, v_pool, qo_indptr, kv_indptr, slots, kq, vq, 1 / math.sqrt(head_dim), cap)
    out = torch_batched.extend_attention(*args, max_elements=max_elements, block=block)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.extend_attention(*args), rtol=1e-4, atol=1e-5)
    q16 = q.to(torch.bfloat16)
    out16 = torch_batched.extend_attention(q16, *args[1:], max_new_tokens=40)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), reference.extend_attention(q16, *args[1:]).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="request 0: 17 new tokens but only 16 kv slots"):
        bad_kv = kv_indptr.clone()
        bad_kv[1:] -= 1
        torch_batched.extend_attention(q, k_pool, v_pool, qo_indptr, bad_kv, slots, kq, vq, 0.1)


def test_batched_decode_rejects_what_the_reference_rejects(poisoned_pool):
    kq = get_quantizer(VectorLayout(head_dim=64, bits=4))
    pool = poisoned_pool(8, 2, kq)
    q = torch.randn(2, 4, 64)
    with pytest.raises(IndexError, match="pool has 8 slots"):
        torch_batched.decode_attention(q, pool, pool, torch.tensor([0, 1, 2]), torch.tensor([0, 8]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        torch_batched.decode_attention(q, pool, pool, torch.tensor([0, 2]), torch.tensor([0, 1]), kq, kq, 0.1)


@pytest.mark.parametrize(("variant", "cap"), [("mse", 0.0), ("prod", 0.0), ("mse", 20.0)])
def test_a_request_gets_bitwise_the_same_output_alone_and_in_a_batch(variant, cap, poisoned_pool):
    """Greedy tokens must not depend on what else is decoded in the same step (prefix-cache/batch invariance)."""
    gen = torch.Generator().manual_seed(5)
    d, hkv, slots_total = 128, 2, 1000
    kq = get_quantizer(VectorLayout(head_dim=d, bits=4, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=d, bits=3, variant=variant))
    k_pool, v_pool = poisoned_pool(slots_total, hkv, kq), poisoned_pool(slots_total, hkv, vq)
    lens = [37, 300, 5, 129, 1, 64, 90, 3, 17, 8, 33, 12, 6, 2, 40, 11]  # 16 requests, as a busy CPU server batches
    slots = torch.randperm(slots_total, generator=gen)[: sum(lens)]
    k, v = (torch.randn(len(slots), hkv, d, generator=gen) for _ in range(2))
    reference.write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    kv_indptr = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    q = torch.randn(
        len(lens), 2 * hkv, d, generator=gen
    )  # 4 query heads, as tq-tiny: a row count that BLAS tiles unevenly
    batch = torch_batched.decode_attention(q, k_pool, v_pool, kv_indptr, slots, kq, vq, 0.09, cap)
    for b in range(len(lens)):
        alone = torch_batched.decode_attention(
            q[b : b + 1], k_pool, v_pool, kv_indptr[b : b + 2] - kv_indptr[b], slots[kv_indptr[b] :], kq, vq, 0.09, cap
        )
        assert torch.equal(alone[0], batch[b])


@pytest.mark.parametrize(("variant", "cap"), [("mse", 0.0), ("prod", 0.0), ("mse", 20.0)])
def test_an_extend_is_bitwise_the_same_with_its_prefix_cached_or_computed(variant, cap, poisoned_pool):
    """A token's output must not depend on how much of its prompt hit the radix cache, on how long the request was
    that computed it, nor on the other requests in the extend batch (tests/test_prefix_invariance.py checks the
    same through the server)."""
    gen = torch.Generator().manual_seed(6)
    d, hkv, n = 128, 2, 150
    kq = get_quantizer(VectorLayout(head_dim=d, bits=4, variant=variant))
    vq = get_quantizer(VectorLayout(head_dim=d, bits=3, variant=variant))
    k_pool, v_pool = poisoned_pool(400, hkv, kq), poisoned_pool(400, hkv, vq)
    slots = torch.randperm(400, generator=gen)[:n]
    k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
    reference.write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    q = torch.randn(n, 2 * hkv, d, generator=gen)
    pool_args = (k_pool, v_pool)
    cold = torch_batched.extend_attention(
        q, *pool_args, torch.tensor([0, n]), torch.tensor([0, n]), slots, kq, vq, 0.09, cap
    )
    other = 40  # a second request in the same batch: its own 40 new tokens over slots it shares
    for prefix in (1, 5, 63, 64, 67, 128, n - 1):
        qo = torch.tensor([0, n - prefix, n - prefix + other])
        kv = torch.tensor([0, n, n + other])
        hit = torch_batched.extend_attention(
            torch.cat([q[prefix:], q[:other]]), *pool_args, qo, kv, torch.cat([slots, slots[:other]]), kq, vq, 0.09, cap
        )
        assert torch.equal(hit[: n - prefix], cold[prefix:]), prefix
    for m in (30, 64, 100):  # the request that first computed a shared prefix was only that long
        alone = torch.tensor([0, m])
        short = torch_batched.extend_attention(q[:m], *pool_args, alone, alone, slots[:m], kq, vq, 0.09, cap)
        assert torch.equal(short, cold[:m]), m


@pytest.mark.parametrize(
    ("bits", "variant"),
    [
        (1, "prod"),
        (2, "mse"),
        (2.5, "mse"),
        (3, "mse"),
        (3.5, "mse"),
        (4, "mse"),
        (3, "prod"),
        (4, "prod"),
        (16, "mse"),
    ],
)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_storage_decode_times_the_storage_basis_is_the_reconstruction(bits, variant, head_dim):
    """The CPU torch path's byte-table decode: records in the storage basis W, x~ = y @ W."""
    qz = get_quantizer(VectorLayout(head_dim=head_dim, bits=bits, variant=variant))
    packed = qz.quantize(3.0 * torch.randn(6, 2, head_dim, generator=torch.Generator().manual_seed(2)))
    y, basis = torch_batched.storage_decode(qz, packed), torch_batched.cpu_tables(qz).storage_basis
    assert y.shape == (6, 2, basis.shape[0]) and basis.shape == (head_dim * (2 if variant == "prod" else 1), head_dim)
    torch.testing.assert_close(y @ basis, qz.dequantize(packed), rtol=1e-5, atol=1e-5)
