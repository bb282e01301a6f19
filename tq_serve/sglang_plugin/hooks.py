"""The two SGLang functions the plug-in wraps (AROUND hooks), and the one KVLayout both derive from the model.

- capacity: DefaultPoolConfigurator._compute_cell_size(kvc, num_layers) returns the bytes one token slot costs;
  SGLang divides its KV memory budget by it to get max_total_num_tokens. With turboquant it returns
  KVLayout.bytes_per_token, so the same memory holds bf16_bytes / packed_bytes times the tokens
  (3.9x at 4 bits, 5.1x at 3, 7.5x at 2 for head_dim 128).
- pool: KVCacheConfigurator._resolve_kv_pool_class(kind="mha") picks the KV pool class; with turboquant it returns
  TurboQuantKVPool bound to the same layout, so the pool allocates exactly what the capacity computation charged.

Both pass every call through untouched unless turboquant is the attention backend.

- fused KV write: models with a fused rope + KV write (Qwen3-MoE, gpt-oss, Bailing, ...) ask
  models.utils.enable_fused_set_kv_buffer(forward_batch) whether to write bf16 K/V straight into the pool's buffers;
  with the packed pool the answer is always no, so they call attention with the K/V to quantize.
- metrics: after PoolStats.update_scheduler_stats (SGLang publishing its pool gauges, metrics on), the packed pool's
  slots in use are published as TurboQuant's own gauges (tq_serve.metrics).
"""

from __future__ import annotations

from collections.abc import Callable

from sglang.srt.arg_groups.model_override_base import attention_backends_of
from sglang.srt.runtime_context import get_parallel

from tq_serve import metrics
from tq_serve.kernels.layout import KVLayout
from tq_serve.model_support import SPECULATIVE_OPTIONS, refusal, unsupported_option_reason

from .config import BACKEND_NAME, TurboQuantConfig


def turboquant_selected(server_args) -> bool:
    """Whether turboquant serves this model. Both prefill and decode must use it: they share the packed pool."""
    prefill, decode = attention_backends_of(server_args)
    if (prefill == BACKEND_NAME) != (decode == BACKEND_NAME):
        raise ValueError(
            f"attention backend {BACKEND_NAME!r} must serve both prefill and decode (they read the same packed pool); "
            f"got prefill={prefill!r}, decode={decode!r}"
        )
    return prefill == BACKEND_NAME


def unsupported_reason(kvc) -> str | None:
    """Why the packed pool cannot serve SGLang's KVCacheConfigurator `kvc` (model and options), or None.

    The launcher refuses the same before SGLang starts (tq_serve.model_support); this catches what arrives another
    way, e.g. an SGLang started by hand with `--attention-backend turboquant`."""
    model_config = kvc.model_config
    archs = model_config.hf_config.architectures
    if kvc.use_mla_backend:
        return f"{archs} uses multi-head latent attention (MLA): one compressed latent per token, not per-head K/V"
    if kvc.mambaish_config is not None:
        return f"{archs} has linear-attention or state-space layers, which keep a recurrent state, not per-token K/V"
    if kvc.is_hybrid_swa:
        return (
            f"{archs} asks for SGLang's hybrid sliding-window pool (two pools); TurboQuant packs one full pool: "
            "start it with --disable-hybrid-swa-memory"
        )
    if getattr(model_config, "is_encoder_decoder", False):
        return f"{archs} is an encoder-decoder model, whose cross attention reads a second, encoder-side KV cache"
    if getattr(getattr(model_config, "hf_text_config", None), "cross_attention_layers", None):
        return f"{archs} has cross-attention layers, which read a second KV cache"
    server_args = getattr(kvc, "server_args", None)
    return unsupported_option_reason({name: getattr(server_args, name, None) for name in SPECULATIVE_OPTIONS})


def kv_layout_of(kvc, config: TurboQuantConfig) -> KVLayout:
    """The packed layout of the layers this process holds, from SGLang's KVCacheConfigurator `kvc`.

    Refuses the KV-cache families TurboQuant does not pack (MLA, linear attention, encoder-decoder, cross attention,
    speculative decoding, SGLang's two-pool hybrid SWA layout, another KV dtype), naming the reason and --kv-cache bf16.
    """
    model_config = kvc.model_config
    reason = unsupported_reason(kvc)
    if reason is not None:
        raise NotImplementedError(refusal(reason))
    if kvc.kv_cache_dtype_str not in (None, "auto"):
        raise ValueError(f"attention backend {BACKEND_NAME!r} sets the KV format itself: drop --kv-cache-dtype")
    if model_config.head_dim != model_config.v_head_dim:
        raise NotImplementedError(f"attention backend {BACKEND_NAME!r} needs head_dim == v_head_dim")
    parallel = get_parallel()
    return config.kv_layout(
        num_layers=model_config.num_hidden_layers,
        num_kv_heads=model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size),
        head_dim=model_config.head_dim,
        start_layer=kvc.layer_info.start_layer,
        end_layer=kvc.layer_info.end_layer,
    )


def compute_cell_size(config: TurboQuantConfig, original: Callable, configurator, kvc, num_layers: int) -> int:
    """AROUND hook of DefaultPoolConfigurator._compute_cell_size: bytes per token slot."""
    if not turboquant_selected(kvc.server_args):
        return original(configurator, kvc, num_layers)
    layout = kv_layout_of(kvc, config)
    if layout.num_layers != num_layers:
        raise ValueError(f"SGLang sizes {num_layers} KV layers but the TurboQuant layout has {layout.num_layers}")
    return layout.bytes_per_token


def resolve_kv_pool_class(config: TurboQuantConfig, original: Callable, kvc, *, kind: str, default: type) -> type:
    """AROUND hook of KVCacheConfigurator._resolve_kv_pool_class: the packed pool for the MHA kind."""
    if kind != "mha" or not turboquant_selected(kvc.server_args):
        return original(kvc, kind=kind, default=default)
    from .pool import TurboQuantKVPool  # imports the memory pool module: only in processes that build a pool

    return TurboQuantKVPool.bind(kv_layout_of(kvc, config), config)


def publish_pool_slots(result: None, pool_stats, stats) -> None:
    """AFTER hook of PoolStats.update_scheduler_stats: the same accounting SGLang's sglang:kv_* gauges get."""
    metrics.publish_slots(pool_stats.full_capacity, pool_stats.full_available_size, pool_stats.full_evictable_size)


def no_fused_kv_write(original: Callable, forward_batch, *, pool=None) -> bool:
    """AROUND hook of models.utils.enable_fused_set_kv_buffer: never for the packed pool, whose rows are not bf16
    K/V (SGLang would enable it on CUDA, where the pool reports the model's bf16 dtype). `pool`: the forward
    context's (get_token_to_kv_pool(), as the hooked function reads it) unless given."""
    if pool is None:
        from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

        pool = get_token_to_kv_pool()
    if getattr(pool, "kv_layout", None) is not None:  # TurboQuantKVPool (pool.py)
        return False
    return original(forward_batch)
