"""The C++ CPU attention (kernels/cpu_attention.py) against the reference on the same packed data, and its
invariance by construction: the same bits alone or in a batch, with a prefix cached or computed, on 1 or N threads.

The invariance tests compare the kernel with itself only: its reduction order is fixed by its own code, so they must
hold on any x86 CPU and thread count (no assertion here rests on how a library splits or rounds its work)."""

import itertools
import logging
import math
import subprocess
import sys

import pytest
import torch
from tq_serve.kernels import cpu_attention, reference, torch_batched
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.quantizer import get_quantizer

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler: the torch fallback serves")


def _setup(poisoned_pool, head_dim, k_bits, v_bits, variant, lens, hkv=2, seed=0, norm_dtype="float16"):
    """A pool whose unused slots poison any read, `lens` requests' K/V written at random slots."""
    gen = torch.Generator().manual_seed(seed)
    kq = get_quantizer(VectorLayout(head_dim=head_dim, bits=k_bits, variant=variant, norm_dtype=norm_dtype))
    vq = get_quantizer(VectorLayout(head_dim=head_dim, bits=v_bits, variant=variant, norm_dtype=norm_dtype))
    total = sum(lens) + 7
    k_pool, v_pool = poisoned_pool(total, hkv, kq), poisoned_pool(total, hkv, vq)
    slots = torch.randperm(total, generator=gen)[: sum(lens)]
    k, v = (torch.randn(len(slots), hkv, head_dim, generator=gen) for _ in range(2))
    reference.write_kv(k_pool, v_pool, k, v, slots, kq, vq)
    indptr = torch.tensor([0, *itertools.accumulate(lens)])
    return gen, kq, vq, k_pool, v_pool, slots, indptr


def _assert_matches(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-4 relative to the output's scale (fp32 kernel vs fp32 reference, different summation orders)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)


def _check_against_reference(poisoned_pool, head_dim, k_bits, v_bits, variant, group, cap, lens, prefixes=None):
    gen, kq, vq, k_pool, v_pool, slots, indptr = _setup(poisoned_pool, head_dim, k_bits, v_bits, variant, lens)
    sm_scale = 1 / math.sqrt(head_dim)
    q = torch.randn(len(lens), 2 * group, head_dim, generator=gen)
    args = (q, k_pool, v_pool, indptr, slots, kq, vq, sm_scale, cap)
    out = cpu_attention.decode_attention(*args)
    assert torch.isfinite(out).all()
    _assert_matches(out, reference.decode_attention(*args))
    # extend: each request's last n_new tokens are new, causal over its prefix and themselves
    new = [max(0, n - p) for n, p in zip(lens, prefixes or [n // 3 for n in lens], strict=True)]
    qo = torch.tensor([0, *itertools.accumulate(new)])
    q = torch.randn(int(qo[-1]), 2 * group, head_dim, generator=gen)
    args = (q, k_pool, v_pool, qo, indptr, slots, kq, vq, sm_scale, cap)
    out = cpu_attention.extend_attention(*args)
    assert torch.isfinite(out).all()
    _assert_matches(out, reference.extend_attention(*args))


MIXED = [17, 0, 1, 1025, 33]  # mixed lengths, an empty request, a single-token context, two decode chunks + 1


@pytest.mark.parametrize(
    ("head_dim", "k_bits", "v_bits", "variant", "group", "cap"),
    [
        (128, 4, 4, "mse", 2, 0.0),
        (128, 3, 2, "mse", 4, 0.0),
        (128, 2, 2, "mse", 8, 30.0),
        (128, 4, 4, "prod", 2, 0.0),
        (64, 3, 3, "prod", 1, 0.0),
        (256, 2.5, 3.5, "mse", 4, 0.0),
        (128, 3.5, 16, "mse", 2, 20.0),
        (80, 2.5, 4, "mse", 2, 0.0),  # planes of 10 bytes: the byte-table decode, not the 8-byte one
        (96, 2, 3, "prod", 4, 0.0),
    ],
)
def test_kernel_matches_the_reference(poisoned_pool, head_dim, k_bits, v_bits, variant, group, cap):
    _check_against_reference(poisoned_pool, head_dim, k_bits, v_bits, variant, group, cap, MIXED)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize(
    ("bits", "variant"), [(b, "mse") for b in (2, 2.5, 3, 3.5, 4, 16)] + [(b, "prod") for b in (2, 3, 4)]
)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("cap", [0.0, 30.0])
@pytest.mark.parametrize("lens", [[1], [17], [1025], MIXED])
def test_kernel_matches_the_reference_over_the_grid(poisoned_pool, head_dim, bits, variant, group, cap, lens):
    _check_against_reference(poisoned_pool, head_dim, bits, bits, variant, group, cap, lens)


def test_float32_norms_bf16_queries_and_int32_or_int64_indices(poisoned_pool):
    gen, kq, vq, k_pool, v_pool, slots, indptr = _setup(
        poisoned_pool, 128, 4, 3, "mse", [40, 600], norm_dtype="float32"
    )
    q = torch.randn(2, 4, 128, generator=gen).to(torch.bfloat16)
    args = (q, k_pool, v_pool, indptr)
    out = cpu_attention.decode_attention(*args, slots.to(torch.int32), kq, vq, 0.09)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert torch.equal(out, cpu_attention.decode_attention(*args, slots.long(), kq, vq, 0.09))
    expected = reference.decode_attention(*args, slots, kq, vq, 0.09)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)  # bf16 output rounding


def test_the_kernel_rejects_what_the_reference_rejects(poisoned_pool):
    kq = get_quantizer(VectorLayout(head_dim=64, bits=4))
    pool = poisoned_pool(8, 2, kq)
    q = torch.randn(2, 4, 64)
    with pytest.raises(IndexError, match="pool has 8 slots"):
        cpu_attention.decode_attention(q, pool, pool, torch.tensor([0, 1, 2]), torch.tensor([0, 8]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="batch \\+ 1"):
        cpu_attention.decode_attention(q, pool, pool, torch.tensor([0, 2]), torch.tensor([0, 1]), kq, kq, 0.1)
    with pytest.raises(ValueError, match="request 0: 2 new tokens but only 1 kv slots"):
        cpu_attention.extend_attention(
            q, pool, pool, torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([0]), kq, kq, 0.1
        )


# ------------------------------------------------------------------------------------------------------ invariance

VARIANTS = [("mse", 0.0), ("prod", 0.0), ("mse", 20.0)]


@pytest.mark.parametrize(("variant", "cap"), VARIANTS)
def test_a_decoded_request_is_bitwise_the_same_alone_in_a_batch_and_on_any_thread_count(poisoned_pool, variant, cap):
    lens = [37, 1300, 5, 129, 1, 64, 700, 3, 17, 8, 33, 12, 6, 2, 40, 11]  # 1300, 700: several 512-key chunks
    gen, kq, vq, k_pool, v_pool, slots, indptr = _setup(poisoned_pool, 128, 4, 3, variant, lens)
    q = torch.randn(len(lens), 4, 128, generator=gen)
    batch = cpu_attention.decode_attention(q, k_pool, v_pool, indptr, slots, kq, vq, 0.09, cap, num_threads=1)
    for threads in (2, 3, 8):
        again = cpu_attention.decode_attention(q, k_pool, v_pool, indptr, slots, kq, vq, 0.09, cap, num_threads=threads)
        assert torch.equal(again, batch), threads
    for b in range(len(lens)):
        for threads in (1, 2):
            alone = cpu_attention.decode_attention(
                q[b : b + 1],
                k_pool,
                v_pool,
                indptr[b : b + 2] - indptr[b],
                slots[indptr[b] :],
                kq,
                vq,
                0.09,
                cap,
                num_threads=threads,
            )
            assert torch.equal(alone[0], batch[b]), (b, threads)


def test_decode_does_not_depend_on_torchs_thread_count(poisoned_pool):
    """Default threads follow torch's (above PARALLEL_MIN_KEYS of work): the output must not."""
    lens = [cpu_attention.PARALLEL_MIN_KEYS, 300]
    gen, kq, vq, k_pool, v_pool, slots, indptr = _setup(poisoned_pool, 64, 4, 4, "mse", lens, hkv=1)
    q = torch.randn(len(lens), 4, 64, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            outs.append(cpu_attention.decode_attention(q, k_pool, v_pool, indptr, slots, kq, vq, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize(("variant", "cap"), VARIANTS)
def test_an_extend_is_bitwise_the_same_with_its_prefix_cached_or_computed(poisoned_pool, variant, cap):
    """A token's output must not depend on how much of its prompt hit the radix cache, on how long the request was
    that computed it, on the other requests in the extend batch, nor on the thread count
    (tests/test_prefix_invariance.py checks the same through the server)."""
    n = 300
    gen, kq, vq, k_pool, v_pool, slots, _ = _setup(poisoned_pool, 128, 4, 3, variant, [n])
    q = torch.randn(n, 4, 128, generator=gen)
    pools = (k_pool, v_pool)
    whole = torch.tensor([0, n])
    cold = cpu_attention.extend_attention(q, *pools, whole, whole, slots, kq, vq, 0.09, cap, num_threads=1)
    assert torch.equal(
        cpu_attention.extend_attention(q, *pools, whole, whole, slots, kq, vq, 0.09, cap, num_threads=2), cold
    )
    other = 40  # a second request in the same batch: its own 40 new tokens over slots it shares
    for prefix in (1, 5, 63, 64, 67, 128, 250, n - 1):
        qo = torch.tensor([0, n - prefix, n - prefix + other])
        kv = torch.tensor([0, n, n + other])
        for threads in (1, 2):
            hit = cpu_attention.extend_attention(
                torch.cat([q[prefix:], q[:other]]),
                *pools,
                qo,
                kv,
                torch.cat([slots, slots[:other]]),
                kq,
                vq,
                0.09,
                cap,
                num_threads=threads,
            )
            assert torch.equal(hit[: n - prefix], cold[prefix:]), (prefix, threads)
            assert torch.equal(hit[n - prefix :], cold[:other]), (prefix, threads)
    for m in (30, 64, 100):  # the request that first computed a shared prefix was only that long
        alone = torch.tensor([0, m])
        short = cpu_attention.extend_attention(q[:m], *pools, alone, alone, slots[:m], kq, vq, 0.09, cap)
        assert torch.equal(short, cold[:m]), m


# -------------------------------------------------------------------------------------------------------- fallback


def test_without_a_compiler_the_ops_fall_back_to_the_torch_path_with_one_log_line(
    poisoned_pool, monkeypatch, caplog, tmp_path
):
    with pytest.raises(RuntimeError, match="failed on cpu_attention.cpp"):
        cpu_attention.build_library(compiler="false")  # a "compiler" that fails
    gen, kq, vq, k_pool, v_pool, slots, indptr = _setup(poisoned_pool, 64, 4, 4, "mse", [20, 3])
    q = torch.randn(2, 2, 64, generator=gen)
    args = (q, k_pool, v_pool, indptr, slots, kq, vq, 0.125)
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    cpu_attention.load_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_attention.__name__):
            assert not cpu_attention.available()
            out = cpu_attention.decode_attention(*args)
            cpu_attention.decode_attention(*args)
        assert [r.getMessage() for r in caplog.records] == [
            "CPU attention kernel unavailable, using the torch path (kernels/torch_batched.py): "
            "no C++ compiler (g++ or c++) on PATH"
        ]
        assert torch.equal(out, torch_batched.decode_attention(*args))
    finally:
        cpu_attention.load_library.cache_clear()


_WIDTH_PROBE = """
import sys, torch
from tq_serve.kernels import cpu_attention as ca
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer
ca.FLAGS = ca.FLAGS + tuple(sys.argv[2:])
gen = torch.Generator().manual_seed(0)
qz = get_quantizer(VectorLayout(head_dim=128, bits=4, variant="mse"))
pools = []
for _ in range(2):
    pool = PackedVectors.empty(qz.layout, (1300, 2))
    pool.codes.copy_(torch.randint(0, 256, pool.codes.shape, generator=gen, dtype=torch.uint8))
    pool.norms.copy_(torch.rand(pool.norms.shape, generator=gen) + 0.5)
    pools.append(pool)
slots = torch.randperm(1300, generator=gen)
q = torch.randn(300, 4, 128, generator=gen)
ext = ca.extend_attention(q, *pools, torch.tensor([0, 300]), torch.tensor([0, 1300]), slots, qz, qz, 0.088)
dec = ca.decode_attention(q[:2], *pools, torch.tensor([0, 700, 1300]), slots, qz, qz, 0.088)
assert ca.available()
torch.save((ext, dec), sys.argv[1])
"""


@pytest.mark.skipif(
    cpu_attention._compiler() is None or sys.platform != "linux" or "avx512f" not in open("/proc/cpuinfo").read(),
    reason="needs a C++ compiler and a CPU with AVX-512 to build both widths",
)
def test_avx512_and_avx2_builds_give_bitwise_the_same_outputs(tmp_path):
    """The reduction order does not depend on the vector width the compiler targets: one build as this CPU allows
    (AVX-512 tile products) and one restricted to AVX2 give the same bits for extend and decode."""
    outs = []
    for name, flags in (("native", []), ("avx2", ["-mno-avx512f"])):
        path = tmp_path / f"{name}.pt"
        done = subprocess.run(
            [sys.executable, "-c", _WIDTH_PROBE, str(path), *flags], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(torch.load(path))
    (ext_a, dec_a), (ext_b, dec_b) = outs
    assert torch.equal(ext_a, ext_b) and torch.equal(dec_a, dec_b)
