"""Suite-wide set-up. Without a GPU, Triton kernels run under the interpreter: the switch must be set before triton
is first imported, which is why it lives here and not in the kernel tests."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_pool():
    """poisoned_pool(num_slots, kv_heads, quantizer) -> an empty pool (PackedVectors) whose every vector reads as NaN:
    NaN norms, or for a raw layout 0xFF bytes (a bfloat16 NaN). A kernel that reads a slot outside its batch then
    poisons that request's output."""
    from tq_serve.kernels.packed import PackedVectors

    def make(num_slots: int, kv_heads: int, quantizer) -> PackedVectors:
        pool = PackedVectors.empty(quantizer.layout, (num_slots, kv_heads))
        if quantizer.layout.is_raw:
            pool.codes.fill_(0xFF)
        else:
            pool.norms.fill_(float("nan"))
        return pool

    return make
