"""The one dispatch point between the torch reference and the Triton kernels for the packed-pool operations.

Both implement the same semantics (tq_serve.kernels.reference is the specification):

    write_kv(k_pool, v_pool, k, v, out_cache_loc, k_quantizer, v_quantizer, saturated=None) -> None
    decode_attention(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale, logit_cap,
                     sliding_window_size=None)
    extend_attention(q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale,
                     logit_cap, max_new_tokens=None, sliding_window_size=None)

sliding_window_size is the layer's own (SGLang's RadixAttention attribute; None or -1: none), passed per call, so
the layers of one model may have different windows (Gemma 2 alternates, Gemma 3 is 5:1) on the same ops; every
implementation reads only the slots inside the window. `saturated` (an int64 device tensor of one element, or None)
counts the norms a write saturated at the largest finite value of the norm dtype (docs/ARCHITECTURE.md section 2).

Chosen once per layer, when the pool is built:
- CPU: the C++ kernel of kernels/cpu_attention.py: its write quantizes each vector on its own into its slot (codes
  within kernels/write_budget.py of the reference's); decode and extend read the packed code rows of the slots a
  batch names, in a fixed reduction order (batch- and thread-invariant). Where it cannot be built (no C++
  compiler), the torch path of kernels/torch_batched.py with the reference's write, with one log line.
- CUDA: the Triton kernels (kernels/triton_*.py) with the launch config tuned for this GPU, head_dim, bits and GQA
  group (tq_serve.autotune.store.lookup, which falls back to a rule with one log line); index range checks are off
  (each is a device sync; SGLang's allocator owns the slots). A layer whose layout the kernels do not read (see
  triton_common.unsupported_reason) uses the torch ops, with one log line.
- CPU with `use_triton_interpreter`: the same Triton kernels under TRITON_INTERPRET=1 (set by register() before
  the kernel modules load), checks on: the GPU code path, testable without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from tq_serve.kernels import cpu_attention, reference, torch_batched
from tq_serve.kernels.layout import VectorLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerOps:
    """The packed-pool operations of one layer, launch configs bound."""

    name: str
    write_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]
    extend_attention: Callable[..., torch.Tensor]


TORCH_OPS = LayerOps(
    name="torch",
    write_kv=reference.write_kv,
    decode_attention=torch_batched.decode_attention,
    extend_attention=torch_batched.extend_attention,
)

CPU_KERNEL_OPS = LayerOps(
    name="cpu-kernel",
    write_kv=cpu_attention.write_kv,
    decode_attention=cpu_attention.decode_attention,
    extend_attention=cpu_attention.extend_attention,
)


def cpu_ops() -> LayerOps:
    """The CPU kernel where it builds (compiled once per machine, then cached), else the torch path."""
    return CPU_KERNEL_OPS if cpu_attention.available() else TORCH_OPS


def _tuned_config(kernel: str, k: VectorLayout, v: VectorLayout, group: int) -> dict:
    import triton

    from tq_serve.autotune.store import TuningKey, lookup
    from tq_serve.autotune.tuner import device_name

    key = TuningKey(
        kernel=kernel,
        gpu=device_name(),
        triton=triton.__version__,
        head_dim=k.head_dim,
        k_bits=k.bits,
        v_bits=v.bits,
        group=1 if kernel == "write" else group,  # the write kernel has no queries
        variant=k.variant,
    )
    config, _source = lookup(key)
    return config


def _triton_ops(k: VectorLayout, v: VectorLayout, group: int, interpreted: bool) -> LayerOps:
    from tq_serve.kernels.triton_decode import decode_attention_triton
    from tq_serve.kernels.triton_extend import extend_attention_triton
    from tq_serve.kernels.triton_write import write_kv_triton

    # Interpreted on a CPU (the GPU code path under test): index checks on, and float32 dots, so that it serves the
    # same greedy tokens as the CPU kernel; bf16 dots are a GPU speed choice with their own rounding.
    exact = {"dot_precision": "ieee"} if interpreted else {}
    return LayerOps(
        name="triton",
        write_kv=partial(write_kv_triton, check_indices=interpreted, **_tuned_config("write", k, v, group)),
        decode_attention=partial(
            decode_attention_triton, check_indices=interpreted, **(_tuned_config("decode", k, v, group) | exact)
        ),
        extend_attention=partial(
            extend_attention_triton, check_indices=interpreted, **(_tuned_config("extend", k, v, group) | exact)
        ),
    )


def layer_ops(
    k: VectorLayout, v: VectorLayout, *, group: int, device_type: str, use_triton_interpreter: bool = False
) -> LayerOps:
    """The implementation for one layer of (K, V) layouts, GQA `group` query heads per KV head, on `device_type`."""
    if device_type != "cuda" and not use_triton_interpreter:
        return cpu_ops()
    from tq_serve.kernels.triton_common import unsupported_reason

    reason = unsupported_reason(k) or unsupported_reason(v)
    if reason is not None:
        logger.info(
            "TurboQuant layer with K %s bits, V %s bits: CPU/torch ops (Triton kernels: %s)", k.bits, v.bits, reason
        )
        return TORCH_OPS if device_type == "cuda" else cpu_ops()
    return _triton_ops(k, v, group, interpreted=device_type != "cuda")
