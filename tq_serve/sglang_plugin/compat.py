"""Every SGLang name the plug-in hooks, subclasses or calls, checked at start-up against the installed SGLang.

SGLang's internals move between releases. Rather than fail deep inside model loading with an AttributeError, the
plug-in resolves each name below once in `register()` and refuses to run with a message that names the SGLang
version it supports.
"""

from __future__ import annotations

import inspect
import logging
import pkgutil
from importlib import metadata

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG_VERSION = "0.5.23"

# Hook targets (patched through HookRegistry); the plug-in's hooks pass every call through unless the turboquant
# backend is selected.
POOL_CLASS_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class"
CELL_SIZE_TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"

HOOKED_NAMES = (
    # registration
    "sglang.srt.plugins.hook_registry.HookRegistry",
    "sglang.srt.plugins.hook_registry.HookType",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.arg_groups.choices.ATTENTION_BACKEND_CHOICES",
    "sglang.srt.arg_groups.choices.add_attention_backend_choices",
    "sglang.srt.arg_groups.model_override_base.attention_backends_of",
    # pool class and capacity
    POOL_CLASS_TARGET,
    CELL_SIZE_TARGET,
    "sglang.srt.runtime_context.get_parallel",
    # the packed pool subclasses MHATokenToKVPool and overrides these
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._build_kv_buffer_descs",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._init_data_ptrs_and_strides",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._get_key_buffer",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._get_value_buffer",
    "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.set_kv_buffer",
    "sglang.srt.mem_cache.memory_pool.KvBufferDesc",
    "sglang.srt.mem_cache.memory_pool.KVCache._check_physical_write_loc",
    "sglang.srt.mem_cache.memory_pool.unwrap_write_loc",
    "sglang.srt.constants.GPU_MEMORY_TYPE_KV_CACHE",
    # the attention backend
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend",
    "sglang.srt.layers.attention.base_attn_backend.AttentionBackend.init_forward_metadata_out_graph",
    "sglang.kernels.ops.attention.kv_indices.create_flashinfer_kv_indices_triton",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.MIXED",
)


# The wrapped functions are called with these parameters; a renamed or added parameter breaks the hook silently.
HOOKED_SIGNATURES = {
    POOL_CLASS_TARGET: ("self", "kind", "default"),
    CELL_SIZE_TARGET: ("self", "kvc", "num_layers"),
}


class IncompatibleSGLangError(RuntimeError):
    """The installed SGLang lacks, or has changed, a name the plug-in hooks."""


def installed_sglang_version() -> str | None:
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def missing_names(names: tuple[str, ...] = HOOKED_NAMES) -> list[str]:
    """The names that do not resolve (module not importable, or attribute gone)."""
    missing = []
    for name in names:
        try:
            pkgutil.resolve_name(name)
        except (ImportError, AttributeError, ValueError):
            missing.append(name)
    return missing


def changed_signatures(signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES) -> list[str]:
    """'name(params)' for each resolvable hooked function whose parameters differ from what the hook expects."""
    changed = []
    for name, expected in signatures.items():
        try:
            params = tuple(inspect.signature(pkgutil.resolve_name(name)).parameters)
        except (ImportError, AttributeError, ValueError):
            continue  # reported as missing
        if params != expected:
            changed.append(f"{name}({', '.join(params)}), expected ({', '.join(expected)})")
    return changed


def check_sglang(
    names: tuple[str, ...] = HOOKED_NAMES, signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES
) -> None:
    """Raise IncompatibleSGLangError naming the supported version when a hooked name is gone or changed."""
    installed = installed_sglang_version()
    problems = [f"missing: {name}" for name in missing_names(names)]
    problems += [f"changed: {change}" for change in changed_signatures(signatures)]
    if problems:
        listing = "\n  ".join(problems)
        raise IncompatibleSGLangError(
            f"tq_serve's TurboQuant plug-in supports sglang=={SUPPORTED_SGLANG_VERSION}, but the installed sglang "
            f"({installed or 'not installed'}) differs in {len(problems)} name(s) it hooks:\n  {listing}\n"
            f"Install the supported version: pip install sglang=={SUPPORTED_SGLANG_VERSION}"
        )
    if installed != SUPPORTED_SGLANG_VERSION:
        logger.warning(
            "tq_serve's TurboQuant plug-in is tested with sglang==%s; sglang %s is installed (every hooked name "
            "resolves, so it will try)",
            SUPPORTED_SGLANG_VERSION,
            installed,
        )
