"""The SGLang version tq_serve runs on, and every SGLang name the plug-in hooks, subclasses or calls.

One policy, applied by the launcher's preflight (server.py) and by the plug-in's register() in every SGLang process:
any SGLang but SUPPORTED_SGLANG_VERSION is refused. The plug-in subclasses SGLang's KV pool and attention backend and
reads ForwardBatch fields; a name check cannot see a change in what those names mean, and a KV cache that silently
reads the wrong records serves plausible garbage. So the pin (also in pyproject.toml) is the contract, and the name
and signature check below is the diagnosis: it lists what moved, both when the pin is bumped and when an install is
broken, instead of an AttributeError deep inside model loading.
"""

from __future__ import annotations

import inspect
import pkgutil
from importlib import metadata

SUPPORTED_SGLANG_VERSION = "0.5.23"

# Hook targets (patched through HookRegistry); the plug-in's hooks pass every call through unless the turboquant
# backend is selected.
POOL_CLASS_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class"
CELL_SIZE_TARGET = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
# Metrics (tq_serve.metrics): called whenever SGLang publishes its pool gauges.
POOL_STATS_TARGET = "sglang.srt.managers.scheduler_components.pool_stats_observer.PoolStats.update_scheduler_stats"
# Models with a fused rope + KV write ask this first (hooks.no_fused_kv_write).
FUSED_KV_WRITE_TARGET = "sglang.srt.models.utils.enable_fused_set_kv_buffer"

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
    POOL_STATS_TARGET,
    FUSED_KV_WRITE_TARGET,
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
    POOL_STATS_TARGET: ("self", "stats"),
    FUSED_KV_WRITE_TARGET: ("forward_batch",),
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


def check_sglang_version(installed: str | None = None) -> None:
    """Raise IncompatibleSGLangError unless SGLang SUPPORTED_SGLANG_VERSION is installed. Reads package metadata only:
    the launcher calls it before it imports sglang (which must come after the CPU set-up)."""
    installed = installed_sglang_version() if installed is None else installed
    if installed != SUPPORTED_SGLANG_VERSION:
        found = f"SGLang {installed} is installed" if installed else "SGLang is not installed"
        raise IncompatibleSGLangError(
            f"{found}, but tq_serve supports sglang=={SUPPORTED_SGLANG_VERSION} only (its plug-in hooks SGLang "
            f"internals): pip install sglang=={SUPPORTED_SGLANG_VERSION}"
        )


def check_sglang(
    names: tuple[str, ...] = HOOKED_NAMES, signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES
) -> None:
    """Raise IncompatibleSGLangError naming the supported version when the installed SGLang is another version, or a
    hooked name is gone or changed (imports the hooked SGLang modules)."""
    check_sglang_version()
    problems = [f"missing: {name}" for name in missing_names(names)]
    problems += [f"changed: {change}" for change in changed_signatures(signatures)]
    if problems:
        listing = "\n  ".join(problems)
        raise IncompatibleSGLangError(
            f"tq_serve's TurboQuant plug-in supports sglang=={SUPPORTED_SGLANG_VERSION}, but the installed sglang "
            f"differs in {len(problems)} name(s) it hooks:\n  {listing}\n"
            f"Reinstall the supported version: pip install --force-reinstall sglang=={SUPPORTED_SGLANG_VERSION}"
        )
