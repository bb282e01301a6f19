"""Suite-wide set-up. Without a GPU, Triton kernels run under the interpreter: the switch must be set before triton
is first imported, which is why it lives here and not in the kernel tests. The caller's TQ_* variables are scrubbed."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def no_tq_environment():
    """No TQ_* variable of the caller's environment reaches a test: they configure `python -m tq_serve`, and every
    test that resolves settings or starts a server (e2e, load test, deploy, benchmarks) must run on what it sets
    itself. Session scope, so that module-scoped server fixtures start after the scrub."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TQ_")]:
            patch.delenv(name)
        yield


@pytest.fixture
def poisoned_pool():
    """poisoned_pool(num_slots, kv_heads, quantizer) -> an empty pool (PackedVectors) whose every vector reads as NaN:
    NaN norms, or for a raw layout 0xFF bytes (a bfloat16 NaN). A kernel that reads a slot outside its batch then
    poisons that request's output. poisoned_pool.poison(pool, slots, quantizer) poisons those slots of a pool."""
    from tq_serve.kernels.packed import PackedVectors

    def poison(pool: PackedVectors, slots, quantizer) -> None:
        if quantizer.layout.is_raw:
            pool.codes[slots] = 0xFF
        else:
            pool.norms[slots] = float("nan")

    def make(num_slots: int, kv_heads: int, quantizer) -> PackedVectors:
        pool = PackedVectors.empty(quantizer.layout, (num_slots, kv_heads))
        poison(pool, slice(None), quantizer)
        return pool

    make.poison = poison
    return make
