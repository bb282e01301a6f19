"""The fused writes vs reference.write_kv on the same inputs: the packed bytes themselves are compared.

Two fused writes: the Triton kernel and the C++ CPU kernel (kernels/cpu_attention.py, which the CPU ops write with).
Exact except where a rotated coordinate lies within rounding of a codebook boundary (each sums the norm and the
rotation in another order than torch's matmul): such a code may move by one level, on at most MAX_CODE_FLIPS of the
coordinates, and a prod record then gets a different residual, so its QJL signs may differ on at most MAX_SIGN_FLIPS
(write_budget.write_mismatch holds the budget; the tuner and the GPU check use the same one). On a GPU the Triton
tests run on CUDA tensors (the `device` fixture); without one the kernel runs on the CPU under the interpreter, at
small sizes.
"""

from __future__ import annotations

import pytest
import torch
from tq_serve.kernels import cpu_attention
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import TurboQuantizer, get_quantizer, unpack_plane
from tq_serve.kernels.reference import write_kv
from tq_serve.kernels.triton_write import write_kv_triton
from tq_serve.kernels.write_budget import MAX_CODE_FLIPS, MAX_SIGN_FLIPS, write_mismatch

needs_cpu_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="the CPU kernel needs a C++ compiler")


@pytest.fixture
def device() -> torch.device:
    """CUDA where there is a GPU (the kernel compiles and runs for real), else the CPU under the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


NORM_RTOL = {"float16": 2**-10, "float32": 1e-6}  # one float16 ulp; float32 sums differ in the last bits

# (head_dim, k_bits, v_bits, variant, k_norm_correction, norm_dtype, dtype)
CASES = [
    (64, 4, 4, "mse", False, "float16", torch.bfloat16),
    (64, 2, 3, "mse", False, "float32", torch.float32),
    (80, 3, 4, "mse", False, "float16", torch.float16),
    (96, 2, 2, "mse", True, "float16", torch.bfloat16),
    (128, 4, 3, "mse", False, "float16", torch.bfloat16),
    (128, 2, 1, "mse", True, "float16", torch.float32),
    (128, 2.5, 3.5, "mse", False, "float16", torch.bfloat16),
    (80, 3.5, 16, "mse", False, "float16", torch.bfloat16),
    (256, 4, 2, "mse", False, "float16", torch.bfloat16),
    (64, 2, 4, "prod", False, "float16", torch.bfloat16),
    (128, 3, 16, "prod", False, "float16", torch.float16),
    (96, 4, 3, "prod", False, "float32", torch.bfloat16),
]


def _case_id(case) -> str:
    d, kb, vb, variant, nc, norm, dtype = case
    return f"d{d}-k{kb}-v{vb}-{variant}{'-nc' if nc else ''}-{norm}-{str(dtype).split('.')[-1]}"


def _compare_records(got: PackedVectors, want: PackedVectors, qz: TurboQuantizer) -> None:
    assert write_mismatch(got, want, qz) is None
    lay = qz.layout
    if lay.is_raw:
        assert torch.equal(got.codes, want.codes)
        return
    codes_got, codes_want = qz.codes(got), qz.codes(want)
    diff = (codes_got - codes_want).abs()
    assert int(diff.max()) <= 1, "a code moved by more than one level"
    assert diff.count_nonzero().item() <= MAX_CODE_FLIPS * diff.numel()
    torch.testing.assert_close(qz.norms(got), qz.norms(want), rtol=NORM_RTOL[lay.norm_dtype], atol=0)
    if lay.variant == "prod":
        plane = qz.qjl_plane
        flips = (unpack_plane(got.codes, plane) != unpack_plane(want.codes, plane)).count_nonzero().item()
        assert flips <= MAX_SIGN_FLIPS * got.shape.numel() * lay.head_dim
        torch.testing.assert_close(qz.residual_norms(got), qz.residual_norms(want), rtol=1e-2, atol=1e-3)


def _pools(layout: VectorLayout, slots: int, heads: int, gen: torch.Generator, device: torch.device):
    """Two equal pools of random bytes, not zeros: slots the kernel must not touch are then checked for stray
    writes."""
    pool = PackedVectors.empty(layout, (slots, heads))
    pool.codes.random_(0, 256, generator=gen)
    pool.norms.uniform_(0.5, 2.0, generator=gen)
    return pool.to(device), pool.to(device)


def _write_matches_reference(case, device, fused_write) -> None:
    d, k_bits, v_bits, variant, k_nc, norm_dtype, dtype = case
    gen = torch.Generator().manual_seed(d * 100 + int(k_bits * 10))
    tokens, heads, slots = 11, 2, 24
    k_lay = VectorLayout(head_dim=d, bits=k_bits, variant=variant, norm_dtype=norm_dtype)
    v_lay = VectorLayout(head_dim=d, bits=v_bits, variant=variant, norm_dtype=norm_dtype)
    k_qz, v_qz = get_quantizer(k_lay, norm_correction=k_nc), get_quantizer(v_lay)
    # Non-contiguous token stride, as when k and v are slices of one fused qkv projection.
    qkv = torch.randn(tokens, 3, heads, d, generator=gen).to(device=device, dtype=dtype)
    k, v = qkv[:, 1] * 2.0, qkv[:, 2] + 0.5
    loc = torch.randperm(slots, generator=gen)[:tokens].to(device)
    (k_ref, k_out), (v_ref, v_out) = _pools(k_lay, slots, heads, gen, device), _pools(v_lay, slots, heads, gen, device)

    write_kv(k_ref, v_ref, k, v, loc, k_qz, v_qz)
    fused_write(k_out, v_out, k, v, loc.to(torch.int32), k_qz, v_qz)

    untouched = torch.ones(slots, dtype=torch.bool, device=device)
    untouched[loc] = False
    for out, ref in ((k_out, k_ref), (v_out, v_ref)):
        assert torch.equal(out.codes[untouched], ref.codes[untouched])
        assert torch.equal(out.norms[untouched], ref.norms[untouched])
    _compare_records(k_out.index_select(loc), k_ref.index_select(loc), k_qz)
    _compare_records(v_out.index_select(loc), v_ref.index_select(loc), v_qz)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_write_matches_reference(case, device) -> None:
    _write_matches_reference(case, device, write_kv_triton)


@needs_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cpu_kernel_write_matches_reference(case) -> None:
    _write_matches_reference(case, torch.device("cpu"), cpu_attention.write_kv)


def test_write_codes_exact_at_scale(device) -> None:
    """Many rows at once (several programs, the last one partial): the codes agree bit for bit on all but a
    boundary-rounding fraction, and the norms exactly."""
    gen = torch.Generator().manual_seed(7)
    lay = VectorLayout(head_dim=128, bits=3)
    qz = get_quantizer(lay)
    tokens, heads = 37, 4
    k = torch.randn(tokens, heads, 128, generator=gen).to(device)
    pools = [PackedVectors.empty(lay, (tokens, heads), device) for _ in range(4)]
    loc = torch.arange(tokens, device=device)
    write_kv(pools[0], pools[1], k, k, loc, qz, qz)
    write_kv_triton(pools[2], pools[3], k, k, loc, qz, qz, block_m=32)
    _compare_records(pools[2], pools[0], qz)
    assert torch.equal(qz.norms(pools[2]), qz.norms(pools[0]))
    assert torch.equal(pools[2].codes, pools[3].codes) and torch.equal(pools[2].norms, pools[3].norms)


def test_write_empty_batch_is_a_no_op(device) -> None:
    lay = VectorLayout(head_dim=64, bits=4)
    qz = get_quantizer(lay)
    pool = PackedVectors.empty(lay, (4, 1), device)
    empty = torch.zeros(0, 1, 64, device=device)
    loc = torch.zeros(0, dtype=torch.int64, device=device)
    write_kv_triton(pool, PackedVectors.empty(lay, (4, 1), device), empty, empty, loc, qz, qz)
    assert not pool.codes.any() and not pool.norms.any()


# -------------------------------------------------------------------------------------------- the CPU kernel's write


@needs_cpu_kernel
@pytest.mark.parametrize("bits", [4, 3, 2.5])
def test_cpu_kernel_write_codes_at_scale(bits) -> None:
    """Thousands of vectors: codes off by one level on at most a boundary-rounding fraction, norms within an ulp."""
    gen = torch.Generator().manual_seed(11)
    lay = VectorLayout(head_dim=128, bits=bits)
    qz = get_quantizer(lay)
    tokens, heads = 1500, 2
    k = (torch.randn(tokens, heads, 128, generator=gen) * torch.rand(tokens, heads, 1, generator=gen) * 8).bfloat16()
    loc = torch.arange(tokens)
    pools = [PackedVectors.empty(lay, (tokens, heads)) for _ in range(4)]
    write_kv(pools[0], pools[1], k, k, loc, qz, qz)
    cpu_attention.write_kv(pools[2], pools[3], k, k, loc, qz, qz)
    _compare_records(pools[2], pools[0], qz)
    assert torch.equal(pools[2].codes, pools[3].codes) and torch.equal(pools[2].norms, pools[3].norms)


@needs_cpu_kernel
@pytest.mark.parametrize("variant", ["mse", "prod"])
def test_cpu_kernel_write_of_a_token_does_not_depend_on_the_batch_or_the_threads(variant) -> None:
    """A vector's record is a function of that vector alone: written alone, among 300 others, on 1 or 2 threads."""
    gen = torch.Generator().manual_seed(12)
    lay = VectorLayout(head_dim=128, bits=3 if variant == "mse" else 4, variant=variant)
    qz = get_quantizer(lay)
    tokens, heads = 301, 2
    k, v = (torch.randn(tokens, heads, 128, generator=gen).bfloat16() for _ in range(2))
    loc = torch.randperm(tokens, generator=gen)
    batched = [PackedVectors.empty(lay, (tokens, heads)) for _ in range(2)]
    cpu_attention.write_kv(*batched, k, v, loc, qz, qz, num_threads=2)
    alone = [PackedVectors.empty(lay, (tokens, heads)) for _ in range(2)]
    for t in range(0, tokens, 50):
        cpu_attention.write_kv(*alone, k[t : t + 1], v[t : t + 1], loc[t : t + 1], qz, qz, num_threads=1)
        for got, want in zip(alone, batched, strict=True):
            assert torch.equal(got.codes[loc[t]], want.codes[loc[t]])
            assert torch.equal(got.norms[loc[t]], want.norms[loc[t]])


@needs_cpu_kernel
def test_cpu_kernel_write_checks_slots_before_writing_anything() -> None:
    lay = VectorLayout(head_dim=64, bits=4)
    qz = get_quantizer(lay)
    pools = [PackedVectors.empty(lay, (8, 1)) for _ in range(2)]
    x = torch.randn(3, 1, 64)
    with pytest.raises(IndexError, match="pool has 8 slots"):
        cpu_attention.write_kv(*pools, x, x, torch.tensor([0, 1, 8]), qz, qz)
    assert not pools[0].codes.any() and not pools[0].norms.any()
    with pytest.raises(ValueError, match="k must be \\(tokens, kv_heads, head_dim\\) = \\(2, 1, 64\\)"):
        cpu_attention.write_kv(*pools, x, x, torch.tensor([0, 1]), qz, qz)
    cpu_attention.write_kv(*pools, x[:0], x[:0], torch.zeros(0, dtype=torch.int64), qz, qz)  # empty: a no-op
    assert not pools[0].codes.any()
