"""The one dispatch point between the torch reference and the Triton kernels for the packed-pool operations.

All three implement the same signatures (tq_serve.kernels.reference is the specification):

    write_kv(k_pool, v_pool, k, v, out_cache_loc, k_quantizer, v_quantizer) -> None
    decode_attention(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale, logit_cap)
    extend_attention(q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale,
                     logit_cap)

CPU: the torch reference (it reads only the slots a batch names). CUDA: the Triton kernels. On a CPU with
`use_triton_interpreter`, the Triton kernels under TRITON_INTERPRET=1 (the plug-in sets the variable before the kernel
modules are imported; Triton reads it when a kernel is decorated).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from tq_serve.kernels import reference

logger = logging.getLogger(__name__)

# Where the Triton implementation lives once it exists: a module exposing the three functions above.
TRITON_OPS_MODULE = "tq_serve.kernels.triton_ops"


@dataclass(frozen=True)
class KVOps:
    name: str
    write_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]
    extend_attention: Callable[..., torch.Tensor]


REFERENCE_OPS = KVOps(
    name="torch reference",
    write_kv=reference.write_kv,
    decode_attention=reference.decode_attention,
    extend_attention=reference.extend_attention,
)


def _triton_ops() -> KVOps:
    module = importlib.import_module(TRITON_OPS_MODULE)
    return KVOps(
        name="triton",
        write_kv=module.write_kv,
        decode_attention=module.decode_attention,
        extend_attention=module.extend_attention,
    )


@cache
def select_ops(device_type: str, use_triton_interpreter: bool = False) -> KVOps:
    """The implementation for a pool on `device_type` ("cpu", "cuda")."""
    if device_type != "cuda" and not use_triton_interpreter:
        return REFERENCE_OPS
    try:
        ops = _triton_ops()
    except ImportError as err:
        if use_triton_interpreter:
            raise RuntimeError(
                f"use_triton_interpreter is set but the Triton kernels ({TRITON_OPS_MODULE}) cannot be imported: {err}"
            ) from err
        logger.warning(
            "TurboQuant Triton kernels (%s) unavailable (%s): using the torch reference on %s",
            TRITON_OPS_MODULE,
            err,
            device_type,
        )
        return REFERENCE_OPS
    logger.info("TurboQuant packed-pool operations: %s on %s", ops.name, device_type)
    return ops
