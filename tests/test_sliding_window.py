"""Sliding-window attention on every path, against kernels/reference.py on the same packed data.

The window is SGLang's (RadixAttention.sliding_window_size W, torch_native's mask): the query at position p sees the
keys p - W .. p. Every case also poisons the slots that lie outside every query's window (NaN norms, or 0xFF bytes
for a raw layout) after the write: an implementation that reads one of them, even to mask it afterwards, turns its
output into NaN, so equality with the unpoisoned run proves those slots are never read.

Paths: the reference, kernels/torch_batched.py, the C++ CPU kernel (where it builds), and the Triton kernels (on a
GPU, or under TRITON_INTERPRET=1 on a CPU: few, small cases, since CI is a 2-core CPU).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tq_serve.kernels import cpu_attention, reference, torch_batched
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer

WINDOWS = [None, 0, 1, 7, 10_000]  # none, only itself, one back, a few tiles' worth of small contexts, past context


def _triton_decode(*args, **kwargs):
    from tq_serve.kernels.triton_decode import decode_attention_triton

    return decode_attention_triton(*args, dot_precision="ieee", block_n=16, num_kv_splits=2, **kwargs)


def _triton_extend(*args, **kwargs):
    from tq_serve.kernels.triton_extend import extend_attention_triton

    return extend_attention_triton(*args, dot_precision="ieee", block_m=16, block_n=16, **kwargs)


CPU_DECODE = {"torch_batched": torch_batched.decode_attention}
CPU_EXTEND = {"torch_batched": torch_batched.extend_attention}
if cpu_attention.available():
    CPU_DECODE["cpu_kernel"] = cpu_attention.decode_attention
    CPU_EXTEND["cpu_kernel"] = cpu_attention.extend_attention


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Case:
    """A packed pool holding `lens` requests at random slots (unused slots poisoned), their indptrs, and for an
    extend the new tokens of each request (the rest is its cached prefix)."""

    def __init__(
        self, poisoned_pool, head_dim, k_bits, v_bits, variant, lens, new=None, hkv=2, group=2, seed=0, device="cpu"
    ):
        gen = torch.Generator().manual_seed(seed)
        self.poison = poisoned_pool.poison
        self.kq = get_quantizer(VectorLayout(head_dim=head_dim, bits=k_bits, variant=variant))
        self.vq = get_quantizer(VectorLayout(head_dim=head_dim, bits=v_bits, variant=variant))
        total = sum(lens) + 5
        self.k_pool, self.v_pool = (poisoned_pool(total, hkv, qz) for qz in (self.kq, self.vq))
        self.slots = torch.randperm(total, generator=gen)[: sum(lens)]
        k, v = (torch.randn(len(self.slots), hkv, head_dim, generator=gen) for _ in range(2))
        reference.write_kv(self.k_pool, self.v_pool, k, v, self.slots, self.kq, self.vq)
        self.lens = lens
        self.new = new if new is not None else [1 if n else 0 for n in lens]
        self.kv_indptr = torch.tensor([0, *itertools.accumulate(lens)])
        self.qo_indptr = torch.tensor([0, *itertools.accumulate(self.new)])
        self.q = torch.randn(int(self.qo_indptr[-1]), hkv * group, head_dim, generator=gen)
        self.q_decode = torch.randn(len(lens), hkv * group, head_dim, generator=gen)
        self.sm_scale = 1 / math.sqrt(head_dim)
        self.device = torch.device(device)

    def poisoned_outside(self, window: int | None, decode: bool) -> Case:
        """A copy whose slots outside every query's window (of a decode, or of the extend) are poisoned."""
        out = object.__new__(Case)
        out.__dict__.update(self.__dict__)
        out.k_pool = PackedVectors(self.k_pool.codes.clone(), self.k_pool.norms.clone())
        out.v_pool = PackedVectors(self.v_pool.codes.clone(), self.v_pool.norms.clone())
        if window is None:
            return out
        bounds = self.kv_indptr.tolist()
        for b, (n_kv, n_new) in enumerate(zip(self.lens, self.new, strict=True)):
            lo = max(0, n_kv - (1 if decode else n_new) - window)
            dead = self.slots[bounds[b] : bounds[b] + lo]
            for pool, qz in ((out.k_pool, self.kq), (out.v_pool, self.vq)):
                self.poison(pool, dead, qz)
        return out

    def decode_args(self):
        d = self.device
        pools = (self.k_pool.to(d), self.v_pool.to(d))
        return (self.q_decode.to(d), *pools, self.kv_indptr.to(d), self.slots.to(d), self.kq, self.vq, self.sm_scale)

    def extend_args(self):
        d = self.device
        return (self.q.to(d), self.k_pool.to(d), self.v_pool.to(d), self.qo_indptr.to(d), self.kv_indptr.to(d),
                self.slots.to(d), self.kq, self.vq, self.sm_scale)  # fmt: skip


def _assert_close(out: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """Within rtol relative to the output's scale (fp32 everywhere, different summation orders)."""
    assert torch.isfinite(out).all()
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), rtol=rtol, atol=rtol * scale)


def _check_paths(case: Case, window, decode_paths, extend_paths, decode=True, extend=True) -> None:
    cap = 0.0
    if decode:
        poisoned = case.poisoned_outside(window, decode=True)
        expected = reference.decode_attention(*case.decode_args(), cap, sliding_window_size=window)
        assert torch.isfinite(expected).all()
        got = reference.decode_attention(*poisoned.decode_args(), cap, sliding_window_size=window)
        assert torch.equal(got, expected), "reference decode read a slot outside the window"
        for name, fn in decode_paths.items():
            clean = fn(*case.decode_args(), cap, sliding_window_size=window)
            _assert_close(clean, expected)
            dirty = fn(*poisoned.decode_args(), cap, sliding_window_size=window)
            assert torch.equal(dirty.cpu(), clean.cpu()), f"{name} decode read a slot outside the window"
    if extend:
        poisoned = case.poisoned_outside(window, decode=False)
        expected = reference.extend_attention(*case.extend_args(), cap, sliding_window_size=window)
        assert torch.isfinite(expected).all()
        got = reference.extend_attention(*poisoned.extend_args(), cap, sliding_window_size=window)
        assert torch.equal(got, expected), "reference extend read a slot outside the window"
        for name, fn in extend_paths.items():
            clean = fn(*case.extend_args(), cap, sliding_window_size=window)
            _assert_close(clean, expected)
            dirty = fn(*poisoned.extend_args(), cap, sliding_window_size=window)
            assert torch.equal(dirty.cpu(), clean.cpu()), f"{name} extend read a slot outside the window"


# ------------------------------------------------------------------------------------------------------ semantics


def test_the_reference_window_is_sglangs_torch_native_mask():
    """Unquantized (raw 16-bit layout) attention through the reference equals dense attention under SGLang's own
    mask (k <= q and k >= q - W, torch_native_backend._make_sliding_window_mask), for extend and decode."""
    gen = torch.Generator().manual_seed(5)
    d, hkv, group, n = 64, 1, 2, 23
    qz = get_quantizer(VectorLayout(head_dim=d, bits=16))
    k_pool, v_pool = PackedVectors.empty(qz.layout, (n, hkv)), PackedVectors.empty(qz.layout, (n, hkv))
    k, v = (torch.randn(n, hkv, d, generator=gen).bfloat16().float() for _ in range(2))
    reference.write_kv(k_pool, v_pool, k, v, torch.arange(n), qz, qz)
    q = torch.randn(n, hkv * group, d, generator=gen)
    for window in (0, 1, 5, 100):
        pos = torch.arange(n)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - window)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=d**-0.5,
        ).transpose(0, 1)  # fmt: skip
        indptr, qo = torch.tensor([0, n]), torch.tensor([0, n])
        ext = reference.extend_attention(q, k_pool, v_pool, qo, indptr, torch.arange(n), qz, qz, d**-0.5,
                                         sliding_window_size=window)  # fmt: skip
        torch.testing.assert_close(ext, dense, rtol=1e-5, atol=1e-5)
        dec = reference.decode_attention(q[-1:], k_pool, v_pool, indptr, torch.arange(n), qz, qz, d**-0.5,
                                         sliding_window_size=window)  # fmt: skip
        torch.testing.assert_close(dec, dense[-1:], rtol=1e-5, atol=1e-5)
    # -1 and None are no window
    none = reference.decode_attention(q[-1:], k_pool, v_pool, indptr, torch.arange(n), qz, qz, d**-0.5)
    minus = reference.decode_attention(q[-1:], k_pool, v_pool, indptr, torch.arange(n), qz, qz, d**-0.5,
                                       sliding_window_size=-1)  # fmt: skip
    assert torch.equal(none, minus)


# ---------------------------------------------------------------------------------------------------- CPU paths

# (head_dim, k_bits, v_bits, variant, group)
CPU_LAYOUTS = [(128, 4, 3, "mse", 4), (64, 3, 2, "prod", 1), (256, 2, 16, "mse", 2)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", CPU_LAYOUTS, ids=lambda c: f"d{c[0]}-k{c[1]}-v{c[2]}-{c[3]}-g{c[4]}")
def test_cpu_paths_match_the_reference_and_never_read_outside_the_window(layout, window, poisoned_pool):
    d, kb, vb, variant, group = layout
    # decode: mixed lengths, an empty request, a single-token context, past one CPU decode chunk (512 keys)
    lens = [17, 0, 1, 600, 40]
    case = Case(poisoned_pool, d, kb, vb, variant, lens, group=group, seed=1)
    _check_paths(case, window, CPU_DECODE, CPU_EXTEND, extend=False)
    # extend: (cached prefix, new tokens) per request; past one 64-key tile and one 64-position torch block
    prefix_new = [(0, 17), (30, 0), (0, 0), (5, 1), (100, 90), (1, 3)]
    lens = [p + n for p, n in prefix_new]
    case = Case(poisoned_pool, d, kb, vb, variant, lens, new=[n for _, n in prefix_new], group=group, seed=2)
    _check_paths(case, window, CPU_DECODE, CPU_EXTEND, decode=False)


@pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler")
@pytest.mark.parametrize("window", [3, 70])
def test_cpu_kernel_with_a_window_is_bitwise_the_same_alone_in_a_batch_and_with_a_cached_prefix(window, poisoned_pool):
    """The window moves where a request's loops start, by its own positions only: its output is the same bits
    alone or in a batch, on 1 or 2 threads, and (extend) with its prefix cached or computed."""
    d = 128
    lens = [300, 700, 45]
    case = Case(poisoned_pool, d, 4, 4, "mse", lens, group=4, seed=3)
    args = case.decode_args()
    batch = cpu_attention.decode_attention(*args, 0.0, sliding_window_size=window, num_threads=2)
    for b, n in enumerate(lens):
        lo = int(case.kv_indptr[b])
        alone = cpu_attention.decode_attention(
            case.q_decode[b : b + 1], case.k_pool, case.v_pool, torch.tensor([0, n]), case.slots[lo : lo + n], case.kq,
            case.vq, case.sm_scale, 0.0, sliding_window_size=window, num_threads=1,
        )  # fmt: skip
        assert torch.equal(alone[0], batch[b])
    # extend one request of 300 tokens whole, then as a cached prefix of 200 + 100 new
    n = 300
    slots = case.slots[:n]
    q = torch.randn(n, 8, d, generator=torch.Generator().manual_seed(9))
    whole = cpu_attention.extend_attention(
        q, case.k_pool, case.v_pool, torch.tensor([0, n]), torch.tensor([0, n]), slots, case.kq, case.vq,
        case.sm_scale, 0.0, sliding_window_size=window,
    )  # fmt: skip
    tail = cpu_attention.extend_attention(
        q[200:], case.k_pool, case.v_pool, torch.tensor([0, 100]), torch.tensor([0, n]), slots, case.kq, case.vq,
        case.sm_scale, 0.0, sliding_window_size=window,
    )  # fmt: skip
    assert torch.equal(whole[200:], tail)


@pytest.mark.parametrize("window", [3, 70])
def test_torch_batched_with_a_window_is_bitwise_the_same_with_a_cached_prefix(window, poisoned_pool):
    d = 64
    case = Case(poisoned_pool, d, 3, 3, "mse", [300], group=2, seed=4)
    n, slots = 300, case.slots
    q = torch.randn(n, 4, d, generator=torch.Generator().manual_seed(9))
    common = (case.k_pool, case.v_pool)
    whole = torch_batched.extend_attention(q, *common, torch.tensor([0, n]), torch.tensor([0, n]), slots, case.kq,
                                           case.vq, case.sm_scale, sliding_window_size=window)  # fmt: skip
    tail = torch_batched.extend_attention(q[200:], *common, torch.tensor([0, 100]), torch.tensor([0, n]), slots,
                                          case.kq, case.vq, case.sm_scale, sliding_window_size=window)  # fmt: skip
    assert torch.equal(whole[200:], tail)


def test_logit_cap_with_a_window_on_the_cpu_paths(poisoned_pool):
    case = Case(poisoned_pool, 128, 4, 4, "mse", [40, 9], new=[12, 9], group=2, seed=6)
    for window in (1, 7):
        exp_d = reference.decode_attention(*case.decode_args(), 5.0, sliding_window_size=window)
        exp_e = reference.extend_attention(*case.extend_args(), 5.0, sliding_window_size=window)
        for name in CPU_DECODE:
            _assert_close(CPU_DECODE[name](*case.decode_args(), 5.0, sliding_window_size=window), exp_d)
            _assert_close(CPU_EXTEND[name](*case.extend_args(), 5.0, sliding_window_size=window), exp_e)


# ------------------------------------------------------------------------------------------------------- Triton


TRITON_DECODE = {"triton": _triton_decode}
TRITON_EXTEND = {"triton": _triton_extend}


@pytest.mark.parametrize("window", [None, 1, 7, 10_000])
def test_triton_kernels_match_the_reference_and_never_read_outside_the_window(window, poisoned_pool):
    """Small sizes (interpreted on a CPU): decode over mixed lengths with 2 splits of 16-key tiles; extend both in
    registers (every request's rows in one row block) and through the unpack-once scratch (more rows than a block)."""
    device = _device()
    case = Case(poisoned_pool, 64, 4, 3, "mse", [1, 0, 21, 40], group=2, seed=7, device=device)
    _check_paths(case, window, TRITON_DECODE, TRITON_EXTEND, extend=False)
    # extend in registers: at most 8 new tokens x group 2 = one 16-row block
    case = Case(poisoned_pool, 64, 4, 3, "mse", [8, 30, 3], new=[8, 5, 0], group=2, seed=8, device=device)
    _check_paths(case, window, TRITON_DECODE, TRITON_EXTEND, decode=False)
    # extend through the scratch: 20 new tokens span 3 row blocks
    case = Case(poisoned_pool, 64, 2, 4, "prod", [45, 6], new=[20, 6], group=2, seed=9, device=device)
    _check_paths(case, window, TRITON_DECODE, TRITON_EXTEND, decode=False)
