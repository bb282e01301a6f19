"""TurboQuant as an SGLang plug-in: attention backend `turboquant` over a packed KV pool.

SGLang loads `register()` through the `sglang.srt.plugins` entry point in every process it starts (launch_server,
Engine, each scheduler), before it parses its arguments. `register()` deserialises the frozen config the launcher put
in TQ_SGLANG_CONFIG (config.py), checks the SGLang version and every name it touches (compat.py), then:

- adds the backend name to SGLang's choices and its creator to the attention registry (backend.py);
- wraps two SGLang functions so that, when turboquant is the backend, capacity is computed from the packed bytes per
  token and the KV pool is the packed pool (hooks.py, pool.py).

Nothing else of SGLang changes: the scheduler, radix cache and allocator work on slot indices, unchanged.
"""

from __future__ import annotations

import logging
import os
from functools import partial

from .compat import CELL_SIZE_TARGET, FUSED_KV_WRITE_TARGET, POOL_CLASS_TARGET, POOL_STATS_TARGET, check_sglang
from .config import BACKEND_NAME, TurboQuantConfig

logger = logging.getLogger(__name__)

_registered: TurboQuantConfig | None = None


def _create_backend(runner):
    from .backend import TurboQuantAttnBackend

    return TurboQuantAttnBackend(runner)


def registered_config() -> TurboQuantConfig | None:
    """The config this process's hooks were registered with (None before `register()`): the SGLang process's view."""
    return _registered


def register() -> None:
    """SGLang plug-in entry point. Idempotent. Raises (SGLang logs it) when the config or SGLang does not fit, in which
    case nothing is registered and `--attention-backend turboquant` is not a valid choice."""
    global _registered
    if _registered is not None:
        return
    config = TurboQuantConfig.from_env()
    check_sglang()
    if config.use_triton_interpreter:
        # Triton reads the switch when a kernel is decorated, so it must be set before the kernel modules load.
        os.environ["TRITON_INTERPRET"] = "1"
    if config.batch_invariant_cpu:
        import torch

        torch.backends.mkldnn.enabled = False  # see TurboQuantConfig.batch_invariant_cpu

    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import hooks

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_backend)
    HookRegistry.register(CELL_SIZE_TARGET, partial(hooks.compute_cell_size, config), HookType.AROUND)
    HookRegistry.register(POOL_CLASS_TARGET, partial(hooks.resolve_kv_pool_class, config), HookType.AROUND)
    HookRegistry.register(POOL_STATS_TARGET, hooks.publish_pool_slots, HookType.AFTER)
    HookRegistry.register(FUSED_KV_WRITE_TARGET, hooks.no_fused_kv_write, HookType.AROUND)
    _registered = config
    logger.info("TurboQuant plug-in registered attention backend %r with %s", BACKEND_NAME, config)
