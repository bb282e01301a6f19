"""Tiny random-weight checkpoints of real architectures, built offline from a transformers config.

    python -m tq_serve.models.tiny_arch gemma2 /tmp/tiny-gemma2       # config.json + model.safetensors + tokenizer
    python -m tq_serve.models.tiny_arch --list

Each one keeps what its architecture's KV cache and attention look like in the released models: head_dim, the GQA
ratio, attention bias, QK-norm, logit soft-capping, the sliding-window pattern and tied embeddings; and shrinks what
does not touch the cache: a few layers, a small hidden size, the 4096-token tokenizer of the bundled tq-tiny (reused
so that prompts are real text). Windows are shrunk too (to WINDOW tokens), so a prompt of a few hundred tokens
crosses them. The weights are random and seeded; nothing is downloaded, and the checkpoints are built at test or
bench time, never committed (a few MB each).

Random weights at transformers' usual init (std 0.02) give nearly uniform attention and flat logits, which would hide
a KV cache's errors and make greedy tokens near-ties; every weight matrix is drawn with std INIT_STD instead, scaled
by sqrt(REFERENCE_WIDTH / hidden_size) (init_std): a fixed std makes a wider stand-in's projections amplify more
(std * sqrt(hidden) per matrix), and the 384- and 448-wide Phi-3 and Qwen2.5 stand-ins at 0.06 moved their logprobs
3x as much (KL) as the 256-wide ones under the same bf16 rounding of attention (README, Supported models).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tq_serve.registry import REPO_ROOT

TOKENIZER_DIR = REPO_ROOT / "models" / "tq-tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB_SIZE = 4096  # tq-tiny's tokenizer
BOS, EOS, PAD = 1, 2, 0
WINDOW = 64
"""Sliding window of the tiny checkpoints, in tokens (the released models use 4096 or 512-1024)."""
INIT_STD = 0.06
"""Weight std of a stand-in REFERENCE_WIDTH wide; init_std scales it to the others."""
REFERENCE_WIDTH = 256
MAX_POSITIONS = 4096


def init_std(hidden_size: int) -> float:
    """The weight std of a stand-in of this hidden size: the same std * sqrt(width) (gain per projection) for all."""
    return INIT_STD * (REFERENCE_WIDTH / hidden_size) ** 0.5


@dataclass(frozen=True)
class TinyArch:
    """One architecture: the transformers config class and the fields of its tiny version."""

    name: str
    hf_architecture: str
    like: str
    """The released model whose attention shape it copies."""
    features: str
    config: Callable[[], object]
    experts: bool = False
    """A mixture of experts: its router picks each token's experts by a discrete top-k."""


def _common(**kwargs) -> dict:
    return {
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_STD,
        "dtype": "bfloat16",
        **kwargs,
    }


def _llama3():
    from transformers import LlamaConfig

    # Llama 3.2 1B/3B: GQA 4:1 (32 q / 8 KV heads at 3B; here 8 / 2), head_dim 128, tied embeddings, llama3 RoPE
    # scaling; 3.1 8B is the same attention with untied embeddings.
    return LlamaConfig(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        )
    )


def _qwen2():
    from transformers import Qwen2Config

    # Qwen2.5 0.5B: 14 q / 2 KV heads (7:1) of head_dim 64, q/k/v projections with bias.
    return Qwen2Config(
        **_common(
            hidden_size=448,
            intermediate_size=896,
            num_hidden_layers=3,
            num_attention_heads=7,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
        )
    )


def _qwen3():
    from transformers import Qwen3Config

    # Qwen3 4B/8B: 32 q / 8 KV heads (4:1) of head_dim 128, RMSNorm on q and k per head (QK-norm), no bias.
    return Qwen3Config(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
        )
    )


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    # Qwen3 30B-A3B: 32 q / 4 KV heads (8:1) of head_dim 128, QK-norm, a mixture of 128 experts (8 active) in every
    # layer; here 8 q / 1 KV head and 8 experts of width 256, 2 active. The KV cache is Qwen3's: the experts only
    # replace the MLP.
    return Qwen3MoeConfig(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=256,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=128,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
        )
    )


def _mistral():
    from transformers import MistralConfig

    # Mistral 7B v0.3: 32 q / 8 KV heads (4:1) of head_dim 128, no window (v0.1's 4096 window is ignored by SGLang's
    # MistralForCausalLM, which serves every layer with full attention).
    return MistralConfig(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    )


def _gemma2():
    from transformers import Gemma2Config

    # Gemma 2 2B/9B: head_dim 256, GQA 2:1, attention-logit soft-cap 50, final-logit soft-cap 30, sliding and full
    # layers alternating (window 4096 there), query_pre_attn_scalar = head_dim.
    return Gemma2Config(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=256,
            query_pre_attn_scalar=256,
            hidden_act="gelu_pytorch_tanh",  # Gemma 2's config.json carries both names; SGLang reads this one
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=WINDOW,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(4)],
        )
    )


def _gemma3():
    from transformers import Gemma3TextConfig

    # Gemma 3 1B-27B: head_dim 256, QK-norm, five sliding layers per full one (window 512-1024 there), local RoPE base
    # 10k and global 1M.
    layers = 6
    return Gemma3TextConfig(
        **_common(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=WINDOW,
            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
            architectures=["Gemma3ForCausalLM"],
        )
    )


def _phi3():
    from transformers import Phi3Config

    # Phi-3 mini: 32 heads and 32 KV heads (MHA) of head_dim 96, fused qkv and gate_up projections (Phi-4 mini keeps
    # the fused projections with GQA 3:1 and head_dim 128).
    return Phi3Config(
        **_common(
            hidden_size=384,
            intermediate_size=768,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )


ARCHS: dict[str, TinyArch] = {
    a.name: a
    for a in (
        TinyArch(
            "llama3", "LlamaForCausalLM", "Llama 3.2 3B", "GQA 4:1, head_dim 128, tied embeddings, llama3 RoPE", _llama3
        ),
        TinyArch("qwen2", "Qwen2ForCausalLM", "Qwen2.5 0.5B", "GQA 7:1, head_dim 64, q/k/v bias", _qwen2),
        TinyArch("qwen3", "Qwen3ForCausalLM", "Qwen3 4B", "GQA 4:1, head_dim 128, QK-norm", _qwen3),
        TinyArch(
            "qwen3moe",
            "Qwen3MoeForCausalLM",
            "Qwen3 30B-A3B",
            "GQA 8:1, head_dim 128, QK-norm, 8 experts (2 active)",
            _qwen3_moe,
            experts=True,
        ),
        TinyArch("mistral", "MistralForCausalLM", "Mistral 7B v0.3", "GQA 4:1, head_dim 128", _mistral),
        TinyArch(
            "gemma2",
            "Gemma2ForCausalLM",
            "Gemma 2 2B",
            f"GQA 2:1, head_dim 256, soft-caps 50/30, sliding window {WINDOW} on every other layer",
            _gemma2,
        ),
        TinyArch(
            "gemma3",
            "Gemma3ForCausalLM",
            "Gemma 3 1B",
            f"GQA 4:1, head_dim 256, QK-norm, sliding window {WINDOW} on 5 of 6 layers",
            _gemma3,
        ),
        TinyArch("phi3", "Phi3ForCausalLM", "Phi-3 mini", "MHA, head_dim 96, fused qkv/gate_up", _phi3),
    )
}


def hf_config(arch: str, num_layers: int | None = None, overrides: dict | None = None):
    """The transformers config of the tiny `arch` (one of ARCHS); `num_layers` repeats its layer pattern, `overrides`
    sets config fields (e.g. attn_logit_softcapping=None)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: known are {', '.join(ARCHS)}")
    config = ARCHS[arch].config()
    config.architectures = [ARCHS[arch].hf_architecture]
    if num_layers is not None:
        pattern = getattr(config, "layer_types", None)
        config.num_hidden_layers = num_layers
        if pattern:
            config.layer_types = [pattern[i % len(pattern)] for i in range(num_layers)]
    config.initializer_range = init_std(config.hidden_size)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def build(
    arch: str, out_dir: str | Path, *, seed: int = 0, num_layers: int | None = None, overrides: dict | None = None
) -> Path:
    """Write the tiny `arch` checkpoint (config.json, model.safetensors, tq-tiny's tokenizer) to out_dir; returns it.

    Deterministic in (arch, seed, the transformers version). A directory that already holds the same build is kept.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    config = hf_config(arch, num_layers, overrides)
    std = config.initializer_range  # init_std(hidden_size), or an override
    stamp = json.dumps({"arch": arch, "seed": seed, "init_std": std, "config": config.to_dict()}, sort_keys=True)
    if (out / ".tiny_arch.json").is_file() and (out / ".tiny_arch.json").read_text() == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            # norm gains keep their init (ones, or zeros for Gemma's 1 + w form)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_DIR / name).is_file():
            shutil.copy(TOKENIZER_DIR / name, out / name)
    (out / ".tiny_arch.json").write_text(stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.models.tiny_arch", description=__doc__.split("\n")[0])
    parser.add_argument("arch", nargs="?", choices=tuple(ARCHS))
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="layers (default: the architecture's few; its pattern repeats)")
    parser.add_argument("--list", action="store_true", help="list the architectures and exit")
    args = parser.parse_args(argv)
    if args.list or args.arch is None:
        for a in ARCHS.values():
            print(f"{a.name:8s} {a.hf_architecture:20s} like {a.like}: {a.features}")
        return 0
    if args.out is None:
        parser.error("give an output directory")
    print(build(args.arch, args.out, seed=args.seed, num_layers=args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
