"""Extreme K/V vectors through write, decode and extend on every path (issue #19, item 6).

Real models have K/V coordinates of 1e4-1e5; with float16 norms (the default) a norm beyond 65504 would become inf
and poison every query that reads it. Here: all-zero vectors, denormal coordinates, one huge coordinate in an
otherwise ~1 vector, norm 1e6, and bfloat16 near its max (whose squares overflow float32 unless scaled). Every write
path (the torch quantizer, the C++ CPU kernel's write, the Triton write kernel) must store finite norms, saturating
at the norm dtype's largest finite value and counting what it saturated; every attention path (reference, torch_batched,
the C++ CPU kernel, Triton decode/extend, interpreted on a CPU) must give finite outputs equal to the reference on
the same packed data; with float32 norms, which hold these norms, close to unquantized attention.
"""

from __future__ import annotations

import math

import pytest
import torch
from tq_serve.kernels import cpu_attention, reference, torch_batched
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer, norm_limit
from tq_serve.kernels.write_budget import write_mismatch

D, HKV, GROUP, TOKENS = 64, 2, 2, 20
BF16_MAX = torch.finfo(torch.bfloat16).max

# The Triton interpreter computes in numpy, which warns where a norm overflows float32 before it is saturated.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def extreme_kv(bf16_max: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (TOKENS, HKV, D) float32: ordinary random vectors, with extremes at tokens 0-5:

    0 all-zero K and V   1 denormal K and V (1e-40)   2 K with one coordinate 1e5, the rest ~1
    3 V of norm 1e6      4 K of norm 1e6 on head 1    5 K and V at bfloat16's max (if bf16_max)
    """
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(TOKENS, HKV, D, generator=gen) for _ in range(2))
    k[0], v[0] = 0.0, 0.0
    k[1], v[1] = 1e-40, -1e-40
    k[2, :, 5] = 1e5
    v[3] = v[3] / v[3].norm(dim=-1, keepdim=True) * 1e6
    k[4, 1] = k[4, 1] / k[4, 1].norm() * 1e6
    if bf16_max:
        k[5], v[5] = BF16_MAX, -BF16_MAX * 0.99
    return k, v


def _device() -> torch.device:
    """Where the Triton kernels run: the GPU if there is one, else the CPU under the interpreter (conftest.py)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(x, device):
    return x.to(device) if isinstance(x, (torch.Tensor, PackedVectors)) else x


def _quantizers(norm_dtype: str, bits=(4, 3)):
    return tuple(get_quantizer(VectorLayout(head_dim=D, bits=b, norm_dtype=norm_dtype)) for b in bits)


def _write(k, v, kq, vq, writer: str = "torch"):
    """Write k, v through `writer`: the torch quantizer (reference), the C++ CPU kernel or the Triton kernel."""
    k_pool, v_pool = PackedVectors.empty(kq.layout, (TOKENS, HKV)), PackedVectors.empty(vq.layout, (TOKENS, HKV))
    saturated = torch.zeros(1, dtype=torch.int64)
    if writer == "triton":
        from tq_serve.kernels.triton_write import write_kv_triton

        dev = _device()
        pools, counter = (k_pool.to(dev), v_pool.to(dev)), saturated.to(dev)
        write_kv_triton(*pools, k.to(dev), v.to(dev), torch.arange(TOKENS, device=dev), kq, vq, saturated=counter)
        (k_pool, v_pool), saturated = (p.to("cpu") for p in pools), counter.cpu()
    else:
        write = cpu_attention.write_kv if writer == "cpu-kernel" else reference.write_kv
        write(k_pool, v_pool, k, v, torch.arange(TOKENS), kq, vq, saturated=saturated)
    return k_pool, v_pool, int(saturated)


def _expected_saturations(k, v, norm_dtype) -> int:
    limit = norm_limit(getattr(torch, norm_dtype))
    norms = torch.cat([x.double().norm(dim=-1).flatten() for x in (k, v)])
    return int((norms > limit).sum())


# --------------------------------------------------------------------------------------------------------- writes


@pytest.mark.parametrize("norm_dtype", ["float16", "float32"])
@pytest.mark.parametrize("writer", ["torch", "cpu-kernel", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_store_finite_norms_saturating_and_counting(norm_dtype, writer, dtype):
    k, v = extreme_kv()
    k, v = k.to(dtype), v.to(dtype)
    kq, vq = _quantizers(norm_dtype)
    k_pool, v_pool, saturated = _write(k, v, kq, vq, writer)
    for pool in (k_pool, v_pool):
        assert torch.isfinite(pool.norms.float()).all()
    assert saturated == _expected_saturations(k.float(), v.float(), norm_dtype)
    limit = norm_limit(getattr(torch, norm_dtype))
    assert float(k_pool.norms[5].float().min()) == limit  # bf16 max: norm ~2.7e39, beyond even float32
    if norm_dtype == "float16":
        # token 5 (K, V), the 1e5 coordinate, the 1e6 V (each on both heads), the 1e6 K
        assert saturated == 4 * HKV + 1
        assert float(k_pool.norms[2].float().min()) == limit
    else:  # float32 holds 1e5 and 1e6 exactly (to float32 rounding)
        assert saturated == 2 * HKV
        torch.testing.assert_close(v_pool.norms[3, :, 0], v[3].float().norm(dim=-1), rtol=1e-6, atol=0)
        torch.testing.assert_close(k_pool.norms[4, 1, 0], k[4, 1].float().norm(), rtol=1e-6, atol=0)
    assert (k_pool.norms[0] == 0).all() and (v_pool.norms[0] == 0).all()  # all-zero: norm 0, no NaN
    for pool, qz in ((k_pool, kq), (v_pool, vq)):
        assert torch.isfinite(qz.dequantize(pool)).all()


@pytest.mark.parametrize("writer", ["cpu-kernel", "triton"])
def test_fused_writes_match_the_torch_write_on_extreme_vectors(writer):
    """Same codes (within the boundary-flip budget) and norms: all scale by the same power of two."""
    k, v = extreme_kv()
    for norm_dtype in ("float16", "float32"):
        kq, vq = _quantizers(norm_dtype)
        ref, tri = _write(k, v, kq, vq), _write(k, v, kq, vq, writer)
        assert ref[2] == tri[2]
        for got, want, qz in ((tri[0], ref[0], kq), (tri[1], ref[1], vq)):
            assert write_mismatch(got, want, qz) is None


def test_ordinary_vectors_quantize_bitwise_as_before_the_scaling():
    """The power-of-two scale is exact: codes and norms of ordinary vectors are those of x / ||x||."""
    from tq_serve.kernels.quantizer import _rotate_each

    gen = torch.Generator().manual_seed(1)
    qz = get_quantizer(VectorLayout(head_dim=128, bits=4))
    x = (torch.randn(500, 128, generator=gen) * torch.rand(500, 1, generator=gen) * 30).bfloat16()
    packed = qz.quantize(x)
    x32 = x.float()
    n = x32.norm(dim=-1)
    y = _rotate_each(x32 / n.unsqueeze(-1), qz.tensors("cpu").rotation.T)
    assert torch.equal(qz.codes(packed), torch.bucketize(y, qz.tensors("cpu").boundaries[0]).int())
    assert torch.equal(packed.norms[..., 0], n.half())


# ------------------------------------------------------------------------------------------------------ attention


def _decode_paths():
    paths = {"torch_batched": torch_batched.decode_attention}
    if cpu_attention.available():
        paths["cpu_kernel"] = cpu_attention.decode_attention
    return paths


def _extend_paths():
    paths = {"torch_batched": torch_batched.extend_attention}
    if cpu_attention.available():
        paths["cpu_kernel"] = cpu_attention.extend_attention
    return paths


def _triton_decode(*args, **kwargs):
    from tq_serve.kernels.triton_decode import decode_attention_triton

    args = [_to(a, _device()) for a in args]
    return decode_attention_triton(*args, dot_precision="ieee", block_n=16, num_kv_splits=2, **kwargs).cpu()


def _triton_extend(*args, **kwargs):
    from tq_serve.kernels.triton_extend import extend_attention_triton

    args = [_to(a, _device()) for a in args]
    return extend_attention_triton(*args, dot_precision="ieee", block_m=16, block_n=16, **kwargs).cpu()


# decode: request 0 reads every token, request 1 the extremes only; extend: request 0 has 8 cached + 12 new tokens,
# request 1 its 6 extreme tokens all new
KV_INDPTR = torch.tensor([0, TOKENS, TOKENS + 6])
KV_INDICES = torch.cat([torch.arange(TOKENS), torch.arange(6)])
QO_INDPTR = torch.tensor([0, 12, 18])


def _queries(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, HKV * GROUP, D, generator=gen), torch.randn(18, HKV * GROUP, D, generator=gen)


def _assert_close(out, expected, rtol):
    assert torch.isfinite(out).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("norm_dtype", ["float16", "float32"])
@pytest.mark.parametrize("writer", ["torch", "cpu-kernel", "triton"])
def test_attention_over_extreme_vectors_is_finite_and_matches_the_reference_on_every_path(norm_dtype, writer):
    # bf16 max in a float32-norm pool would store a norm of 3.4e38: its scores and outputs overflow float32 in any
    # implementation (the reference too), so that pool holds the other extremes only
    k, v = extreme_kv(bf16_max=norm_dtype == "float16")
    kq, vq = _quantizers(norm_dtype)
    k_pool, v_pool, _ = _write(k, v, kq, vq, writer)
    q_dec, q_ext = _queries()
    sm_scale = 1 / math.sqrt(D)
    for cap in (0.0, 30.0):
        dec_args = (q_dec, k_pool, v_pool, KV_INDPTR, KV_INDICES, kq, vq, sm_scale, cap)
        ext_args = (q_ext, k_pool, v_pool, QO_INDPTR, KV_INDPTR, KV_INDICES, kq, vq, sm_scale, cap)
        expected_dec = reference.decode_attention(*dec_args)
        expected_ext = reference.extend_attention(*ext_args)
        assert torch.isfinite(expected_dec).all() and torch.isfinite(expected_ext).all()
        decode_paths = {**_decode_paths(), "triton": _triton_decode}
        extend_paths = {**_extend_paths(), "triton": _triton_extend}
        # within 1e-4 of the output's scale, as for ordinary vectors, though scores reach ~1e4 here
        for fn in decode_paths.values():
            _assert_close(fn(*dec_args), expected_dec, rtol=1e-4)
        for fn in extend_paths.values():
            _assert_close(fn(*ext_args), expected_ext, rtol=1e-4)
        for window in (1, 4):
            expected = reference.extend_attention(*ext_args, sliding_window_size=window)
            for fn in extend_paths.values():
                _assert_close(fn(*ext_args, sliding_window_size=window), expected, rtol=1e-4)


def test_with_float32_norms_attention_over_extreme_vectors_stays_close_to_unquantized():
    """float32 norms hold 1e5 and 1e6: the attention output is then within the 4-bit quantization error of exact
    attention (the huge K of token 2 dominates every query's softmax, so an output is mostly its value)."""
    k, v = extreme_kv(bf16_max=False)
    kq, vq = _quantizers("float32", bits=(4, 4))
    k_pool, v_pool, saturated = _write(k, v, kq, vq)
    assert saturated == 0
    q_dec, q_ext = _queries()
    sm_scale = 1 / math.sqrt(D)
    args = (q_dec, k_pool, v_pool, KV_INDPTR, KV_INDICES, kq, vq, sm_scale)
    exact = []
    for b in range(2):
        slots = KV_INDICES[KV_INDPTR[b] : KV_INDPTR[b + 1]]
        kk, vv = k[slots].repeat_interleave(GROUP, 1), v[slots].repeat_interleave(GROUP, 1)
        scores = torch.einsum("hd,khd->hk", q_dec[b], kk) * sm_scale
        exact.append(torch.einsum("hk,khd->hd", scores.softmax(-1), vv))
    exact = torch.stack(exact)
    for fn in (reference.decode_attention, *_decode_paths().values(), _triton_decode):
        out = fn(*args)
        assert torch.isfinite(out).all()
        err = (out - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert float(err.max()) < 0.15, err
