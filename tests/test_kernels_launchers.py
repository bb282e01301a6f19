"""Bad input to the Triton launchers raises a clear error before any kernel runs (a kernel would corrupt memory)."""

from __future__ import annotations

import pytest
import torch
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer
from tq_serve.kernels.triton_common import part_channels, record_spec, unsupported_reason
from tq_serve.kernels.triton_decode import decode_attention_triton
from tq_serve.kernels.triton_extend import extend_attention_triton
from tq_serve.kernels.triton_write import write_kv_triton

D, HEADS, SLOTS = 64, 2, 8
QZ = get_quantizer(VectorLayout(head_dim=D, bits=4))
PROD1 = get_quantizer(VectorLayout(head_dim=D, bits=1, variant="prod"))


def _pool(qz=QZ, slots: int = SLOTS) -> PackedVectors:
    return PackedVectors.empty(qz.layout, (slots, HEADS))


def _write(**over):
    args = dict(
        k_pool=_pool(), v_pool=_pool(), k=torch.randn(3, HEADS, D), v=torch.randn(3, HEADS, D),
        out_cache_loc=torch.tensor([0, 5, 7]), k_quantizer=QZ, v_quantizer=QZ,
    )  # fmt: skip
    args.update(over)
    launch = {key: args.pop(key) for key in list(args) if key in ("block_m", "dot_precision", "check_indices")}
    write_kv_triton(*args.values(), **launch)


def _decode(**over):
    args = dict(
        q=torch.randn(2, 2 * HEADS, D), k_pool=_pool(), v_pool=_pool(), kv_indptr=torch.tensor([0, 3, 5]),
        kv_indices=torch.tensor([0, 1, 2, 3, 4]), k_quantizer=QZ, v_quantizer=QZ, sm_scale=0.125,
    )  # fmt: skip
    args.update(over)
    launch = {key: args.pop(key) for key in list(args) if key in ("block_n", "num_kv_splits", "check_indices")}
    return decode_attention_triton(*args.values(), **launch)


def _extend(**over):
    args = dict(
        q=torch.randn(3, 2 * HEADS, D), k_pool=_pool(), v_pool=_pool(), qo_indptr=torch.tensor([0, 2, 3]),
        kv_indptr=torch.tensor([0, 3, 5]), kv_indices=torch.tensor([0, 1, 2, 3, 4]), k_quantizer=QZ,
        v_quantizer=QZ, sm_scale=0.125,
    )  # fmt: skip
    args.update(over)
    return extend_attention_triton(*args.values())


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(k=torch.randn(3, HEADS, D, dtype=torch.float64)), ValueError, "float16, bfloat16 or float32"),
        (dict(v=torch.randint(0, 9, (3, HEADS, D))), ValueError, "float16, bfloat16 or float32"),
        (dict(k=torch.randn(3, D, HEADS).transpose(1, 2)), ValueError, "head_dim must be contiguous"),
        (dict(k=torch.randn(3, HEADS + 1, D)), ValueError, "tokens, kv_heads, head_dim"),
        (dict(out_cache_loc=torch.tensor([0, 5])), ValueError, "len\\(out_cache_loc\\)"),
        (dict(out_cache_loc=torch.tensor([0.0, 1.0, 2.0])), ValueError, "int32/int64"),
        (dict(out_cache_loc=torch.tensor([0, 5, SLOTS])), IndexError, "pool has 8 slots"),
        (dict(out_cache_loc=torch.tensor([-1, 5, 7])), IndexError, "pool has 8 slots"),
        (dict(k_pool=PackedVectors(_pool().codes.to(torch.int8), _pool().norms)), ValueError, "expected codes uint8"),
        (dict(v_pool=_pool(get_quantizer(VectorLayout(head_dim=D, bits=2)))), ValueError, "expected codes uint8"),
        (dict(v_pool=_pool().codes), TypeError, "expected PackedVectors"),
        (dict(k_pool=_pool(PROD1), k_quantizer=PROD1), ValueError, "torch reference"),
        (dict(block_m=24), ValueError, "power of two"),
        (dict(dot_precision="bf16"), ValueError, "dot_precision"),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_write_rejects(over, error, match) -> None:
    with pytest.raises(error, match=match):
        _write(**over)


def test_write_rejects_before_touching_the_pool() -> None:
    k_pool = _pool()
    with pytest.raises(IndexError):
        _write(k_pool=k_pool, out_cache_loc=torch.tensor([0, 1, 99]))
    assert not k_pool.codes.any() and not k_pool.norms.any()


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(q=torch.randint(0, 3, (2, 2 * HEADS, D))), ValueError, "float16, bfloat16 or float32"),
        (dict(q=torch.randn(2, 3, D)), ValueError, "multiple of the pool's KV heads"),
        (dict(q=torch.randn(2, 2 * HEADS, 2 * D)), ValueError, "q must be"),
        (dict(kv_indptr=torch.tensor([0, 5])), ValueError, "batch \\+ 1"),
        (dict(kv_indptr=torch.tensor([0, 3, 9])), ValueError, "overruns kv_indices"),
        (dict(kv_indptr=torch.tensor([0, 4, 3])), ValueError, "non-decreasing"),
        (dict(kv_indices=torch.tensor([0, 1, 2, 3, SLOTS])), IndexError, "pool has 8 slots"),
        (dict(kv_indices=torch.tensor([0, -2, 2, 3, 4])), IndexError, "pool has 8 slots"),
        (dict(kv_indices=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])), ValueError, "int32/int64"),
        (dict(k_pool=_pool(PROD1), k_quantizer=PROD1), ValueError, "torch reference"),
        (dict(k_pool=PackedVectors(_pool().codes[:, :1], _pool().norms[:, :1])), ValueError, "KV heads|multiple"),
        (dict(num_kv_splits=0), ValueError, "num_kv_splits"),
        (dict(block_n=8), ValueError, "power of two"),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_decode_rejects(over, error, match) -> None:
    with pytest.raises(error, match=match):
        _decode(**over)


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        (dict(qo_indptr=torch.tensor([0, 3])), ValueError, "must match kv_indptr"),
        (dict(qo_indptr=torch.tensor([0, 1, 2])), ValueError, "rise from 0"),
        (dict(qo_indptr=torch.tensor([0, 2, 3]), kv_indptr=torch.tensor([0, 1, 5])), ValueError, "at least as many"),
        (dict(qo_indptr=torch.tensor([0.0, 2.0, 3.0])), ValueError, "qo_indptr"),
        (dict(kv_indices=torch.tensor([0, 1, 2, 3, 11])), IndexError, "pool has 8 slots"),
    ],
)
def test_extend_rejects(over, error, match) -> None:
    with pytest.raises(error, match=match):
        _extend(**over)


def test_index_checks_can_be_skipped_for_graph_capture() -> None:
    """check_indices=False runs no device sync and gives the same result on valid input (on CUDA where there is a
    GPU: the kernels then run for real)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pools = [_pool().to(device) for _ in range(2)]
    args = dict(
        q=torch.randn(2, 2 * HEADS, D, device=device), k_pool=pools[0], v_pool=pools[1],
        kv_indptr=torch.tensor([0, 3, 5], device=device), kv_indices=torch.tensor([0, 1, 2, 3, 4], device=device),
    )  # fmt: skip
    torch.testing.assert_close(_decode(**args, check_indices=False, num_kv_splits=1), _decode(**args, num_kv_splits=1))


@pytest.mark.parametrize("bits", [1, 2, 2.5, 3, 3.5, 4, 16])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_supported_layouts(bits: float, head_dim: int) -> None:
    """Every mse layout and every prod layout but 1 bit has kernel parts whose tile columns cover each channel exactly
    once (and the QJL sign part, for prod, each channel once more)."""
    for variant in ("mse", "prod"):
        try:
            layout = VectorLayout(head_dim=head_dim, bits=bits, variant=variant)
        except ValueError:
            continue  # the layout itself does not exist (prod at fractional bits)
        if variant == "prod" and bits == 1:
            assert unsupported_reason(layout) is not None
            continue
        spec = record_spec(layout)
        columns = torch.cat([part_channels(p) for p in (spec.seg0, spec.seg1) if p.kind])
        assert sorted(columns[columns >= 0].tolist()) == list(range(head_dim))
        assert columns.numel() == spec.width - (spec.signs.width if spec.signs.kind else 0)
        if variant == "prod" and bits != 16:
            signs = part_channels(spec.signs)
            assert sorted(signs[signs >= 0].tolist()) == list(range(head_dim))
