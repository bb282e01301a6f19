"""Which models and SGLang options the TurboQuant KV cache can serve, decided before SGLang starts.

The packed pool holds one K and one V vector per token, layer and KV head (docs/ARCHITECTURE.md section 2). Models
whose attention keeps something else are refused at start-up, with the reason and the way out (`--kv-cache bf16`,
plain SGLang with its own cache, serves all of them):

- multi-head latent attention (DeepSeek V2/V3/R1, Kimi K2, ...: `kv_lora_rank`): one compressed latent per token;
- linear-attention and state-space hybrids (Qwen3-Next, Jamba, Mamba, Falcon-H1, Nemotron-H, MiniMax, LFM2, ...):
  recurrent state, not per-token K/V, in some or all layers;
- encoder-decoder models (T5, BART, Whisper, ...) and cross attention (Mllama): a second, encoder-side KV cache;
- speculative decoding (`--speculative-algorithm`): the draft model's KV pool and its attention backend.

The same families are refused again inside the plug-in (sglang_plugin/hooks.py), where a model or option arrives
another way (an SGLang started by hand with `--attention-backend turboquant`). Imports neither SGLang nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tq_serve.registry import text_config

ALTERNATIVE = "serve it with --kv-cache bf16 (plain SGLang with its own KV cache)"

LINEAR_ATTENTION_MODEL_TYPES = frozenset(
    {
        "mamba",
        "mamba2",
        "jamba",
        "falcon_h1",
        "falcon_mamba",
        "nemotron_h",
        "zamba",
        "zamba2",
        "bamba",
        "granitemoehybrid",
        "qwen3_next",
        "qwen3_5",
        "qwen3_5_moe",
        "minimax",
        "minimax_m1",
        "lfm2",
        "lfm2_moe",
        "rwkv",
        "recurrent_gemma",
        "kimi_linear",
        "plamo2",
        "hunyuan_v1_hybrid",
    }
)
"""model_type values of linear-attention / state-space (hybrid) models in transformers and SGLang."""
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
"""The `layer_types` entries the packed pool holds (softmax attention over per-token K/V, windowed or not)."""
LINEAR_LAYER_KEYS = (
    "linear_num_value_heads",
    "linear_key_head_dim",
    "mamba_d_state",
    "ssm_state_size",
    "attn_layer_period",
)
ENCODER_DECODER_MODEL_TYPES = frozenset(
    {"t5", "mt5", "umt5", "bart", "mbart", "whisper", "marian", "pegasus", "mllama"}
)


def unsupported_model_reason(config: Mapping[str, Any]) -> str | None:
    """Why the TurboQuant pool cannot hold this model's KV cache (a Hugging Face config.json), or None when it can."""
    text = text_config(dict(config))
    model_type = text.get("model_type") or config.get("model_type")
    architectures = ", ".join(config.get("architectures") or [model_type or "this model"])
    if text.get("kv_lora_rank") is not None or config.get("kv_lora_rank") is not None:
        return (
            f"{architectures} uses multi-head latent attention (MLA, kv_lora_rank={text.get('kv_lora_rank')}): its KV "
            "cache is one compressed latent per token, not the per-head K/V vectors TurboQuant packs"
        )
    layer_types = set(text.get("layer_types") or [])
    other_layers = sorted(layer_types - ATTENTION_LAYER_TYPES)
    if model_type in LINEAR_ATTENTION_MODEL_TYPES or other_layers or any(key in text for key in LINEAR_LAYER_KEYS):
        what = f" ({', '.join(other_layers)} layers)" if other_layers else ""
        return (
            f"{architectures} has linear-attention or state-space layers{what}: they keep a recurrent state, not "
            "per-token K/V vectors, and TurboQuant packs only softmax-attention KV caches"
        )
    if config.get("is_encoder_decoder") or model_type in ENCODER_DECODER_MODEL_TYPES:
        return (
            f"{architectures} is an encoder-decoder model: its decoder's cross attention reads a second, encoder-side "
            "KV cache that the TurboQuant backend does not hold"
        )
    if text.get("cross_attention_layers") or config.get("cross_attention_layers"):
        return (
            f"{architectures} has cross-attention layers: they read encoder (image) states through a second KV cache "
            "that the TurboQuant backend does not hold"
        )
    return None


SPECULATIVE_OPTIONS = ("speculative_algorithm", "speculative_draft_model_path")


def unsupported_option_reason(options: Mapping[str, Any]) -> str | None:
    """Why SGLang server options (field name -> value, as given) cannot run with the TurboQuant backend, or None."""
    for name in SPECULATIVE_OPTIONS:
        if options.get(name):
            return (
                f"speculative decoding (--{name.replace('_', '-')} {options[name]}) is not supported by the TurboQuant "
                "backend: the draft model's KV pool and its verification passes use SGLang's own attention backends"
            )
    return None


def refusal(reason: str) -> str:
    """The one message shape of every refusal: the reason and the alternative."""
    return f"the TurboQuant KV cache cannot serve this: {reason}; {ALTERNATIVE}"
