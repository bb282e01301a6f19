"""Offline quality of a bit schedule: perplexity and greedy next-token agreement with a bf16 KV cache.

    python -m tq_serve.schedule_eval --model tq-tiny --schedule tq-tiny-3.0 tq-tiny-2.5 --uniform 3 2.5

The K/V of every layer are quantized inside the Hugging Face model's own attention. `ATTENTION_NAME` is registered
with transformers' AttentionInterface (and SDPA's mask builder); it hands the layer's query, K (after RoPE, as the
cache stores it) and V to the active `KVTransform`, then runs transformers' SDPA attention on what the transform
returns. `QuantizedKV` round-trips K and V through the TurboQuantizer of each layer's bits, so every token, the
current one included, is attended through its quantized form, as the server does (write first, then attend).
Quantization in the rotated domain and attention on the dequantized vectors agree exactly, because the rotation is
orthogonal (kernels/reference.py).

The reference is the same model with a raw bf16 KV cache (the schedule "uniform 16"): weights and activations stay
float32, so the figures measure the KV cache alone. Over non-overlapping windows (window starts are not scored, as in
tq_serve.models.train_tiny.perplexity): perplexity; the mean KL(bf16 || quantized) of the next-token distributions,
which is the fidelity loss itself (perplexity can move either way: on an under-trained model KV noise that flattens
the distributions lowers it); and greedy agreement, the fraction of positions whose argmax token equals the
reference's (teacher-forced, so one divergence does not derail the rest).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tq_serve.kernels.layout import RAW_BITS, VectorLayout
from tq_serve.kernels.quantizer import TurboQuantizer, get_quantizer
from tq_serve.registry import ModelRegistry
from tq_serve.schedule import BitSchedule

ATTENTION_NAME = "tq_kv_transform"
DEFAULT_WINDOW = 512

KVTransform = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(attention module, query (B, Hq, T, d), key (B, Hkv, T, d), value) -> the key and value the layer attends to."""

_ACTIVE: ContextVar[KVTransform | None] = ContextVar("tq_kv_transform", default=None)


def _attention(module, query, key, value, attention_mask, **kwargs):
    transform = _ACTIVE.get()
    if transform is not None:
        key, value = transform(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def kv_transform(transform: KVTransform | None) -> Iterator[None]:
    """Within the block, models loaded by `load_model` attend to transform(module, q, k, v) instead of (k, v)."""
    token = _ACTIVE.set(transform)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def roundtrip(quantizer: TurboQuantizer, x: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> what the packed cache gives back for it, in x's dtype."""
    return quantizer.dequantize(quantizer.quantize(x)).to(x.dtype)


def layer_quantizer(
    head_dim: int,
    bits: float,
    *,
    variant: str = "mse",
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
) -> TurboQuantizer:
    """The quantizer a layer's K or V uses at `bits`; raw (16-bit) layers take the mse variant and no norm
    correction: a raw record is the same whatever the variant."""
    layout = VectorLayout(head_dim=head_dim, bits=bits, variant="mse" if bits == RAW_BITS else variant)
    return get_quantizer(layout, seed, rotation, norm_correction and bits != RAW_BITS)


class QuantizedKV:
    """The KVTransform of a schedule: layer l's K and V through the quantizers of layer_bits[l]."""

    def __init__(
        self,
        layer_bits: Sequence[tuple[float, float]],
        *,
        head_dim: int,
        variant: str = "mse",
        seed: int = 0,
        rotation: str = "qr",
        norm_correction: bool = False,
    ):
        options = {"variant": variant, "seed": seed, "rotation": rotation, "norm_correction": norm_correction}
        self.quantizers = [
            (layer_quantizer(head_dim, k, **options), layer_quantizer(head_dim, v, **options)) for k, v in layer_bits
        ]

    def __call__(self, module, query, key, value):
        k_quantizer, v_quantizer = self.quantizers[module.layer_idx]
        return roundtrip(k_quantizer, key), roundtrip(v_quantizer, value)


def resolve_model_dir(model: str) -> Path:
    """An alias of configs/models.yaml or a model directory -> the directory with config.json and weights."""
    return ModelRegistry.load().resolve(model).path


def load_model(model: str) -> tuple[PreTrainedModel, AutoTokenizer, Path]:
    """The model in float32 with the KV-transform attention, its tokenizer, and its directory."""
    path = resolve_model_dir(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION_NAME)
    return lm.eval(), tokenizer, path


def token_windows(
    tokenizer: AutoTokenizer, text: str, window: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """The text's tokens (no special tokens) in non-overlapping windows of `window`; a last window < 2 is dropped."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [ids[s : s + window] for s in range(0, len(ids), window) if len(ids[s : s + window]) >= 2]


@dataclass(frozen=True, kw_only=True)
class Quality:
    """How one KV setting scores over the scored positions, against the bf16 KV cache."""

    label: str
    average_bits: float
    bytes_per_token: int
    perplexity: float
    kl_to_bf16: float
    """Mean KL(bf16 || this) of the next-token distributions, nats per token: the fidelity loss itself."""
    agreement: float
    """Fraction of positions whose argmax token equals the bf16 cache's."""
    tokens: int


@torch.no_grad()
def evaluate_schedules(
    lm: PreTrainedModel,
    windows: Sequence[torch.Tensor],
    schedules: Sequence[BitSchedule],
    *,
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    show_progress: bool = False,
) -> list[Quality]:
    """Quality of the bf16 KV cache (first row, the reference) and of each schedule, on the same windows.

    Every setting runs on a window right after the reference, so no full-text logits are ever held.
    """
    config = lm.config
    num_layers, head_dim = config.num_hidden_layers, config.head_dim
    settings = [BitSchedule.uniform(num_layers, RAW_BITS, name="bf16"), *schedules]
    transforms = []
    for schedule in settings:
        schedule.check_layers(num_layers)
        transforms.append(
            QuantizedKV(
                schedule.layer_bits,
                head_dim=head_dim,
                variant=schedule.variant,
                seed=seed,
                rotation=rotation,
                norm_correction=norm_correction,
            )
        )
    nll, kl, agree = [0.0] * len(settings), [0.0] * len(settings), [0] * len(settings)
    with tqdm(total=len(windows) * len(settings), desc="windows x settings", disable=not show_progress) as bar:
        for ids in windows:
            for i, transform in enumerate(transforms):
                with kv_transform(transform):
                    logp = lm(input_ids=ids[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
                if i == 0:
                    reference, reference_argmax = logp, logp.argmax(-1)
                nll[i] -= logp.gather(-1, ids[1:, None]).sum().item()
                kl[i] += F.kl_div(logp, reference, log_target=True, reduction="sum").item()
                agree[i] += (logp.argmax(-1) == reference_argmax).sum().item()
                bar.update()
    tokens = sum(len(ids) - 1 for ids in windows)
    return [
        Quality(
            label=schedule.name,
            average_bits=schedule.average_bits,
            bytes_per_token=schedule.kv_layout(
                num_kv_heads=config.num_key_value_heads, head_dim=head_dim
            ).bytes_per_token,
            perplexity=math.exp(nll[i] / tokens),
            kl_to_bf16=kl[i] / tokens,
            agreement=agree[i] / tokens,
            tokens=tokens,
        )
        for i, schedule in enumerate(settings)
    ]


def format_table(rows: Sequence[Quality]) -> str:
    """A Markdown table; the first row is the bf16 reference."""
    lines = [
        "| KV cache | avg bits | bytes/token | perplexity | vs bf16 | KL to bf16 (nats/token) | greedy agreement |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = r.perplexity / rows[0].perplexity - 1
        lines.append(
            f"| {r.label} | {r.average_bits:.3g} | {r.bytes_per_token} | {r.perplexity:.2f} | {delta:+.3%} "
            f"| {r.kl_to_bf16:.3g} | {r.agreement:.2%} |"
        )
    return "\n".join(lines)


def _uniform_setting(text: str) -> tuple[float, float]:
    """`3` (K and V) or `2/4` (k_bits/v_bits), for --uniform."""
    k, _, v = text.partition("/")
    try:
        return float(k), float(v or k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BITS or K_BITS/V_BITS, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> list[Quality]:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.schedule_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tq-tiny", help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--schedule", nargs="*", default=[], help="schedule files or names in configs/schedules/")
    parser.add_argument(
        "--uniform",
        nargs="*",
        type=_uniform_setting,
        default=[],
        help="uniform settings to compare: BITS for K and V, or K_BITS/V_BITS",
    )
    parser.add_argument("--variant", default="mse", help="variant of the uniform rows")
    parser.add_argument("--text", type=Path, help="evaluation text (default: heldout.txt in the model directory)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per scored window")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed (as the server's --seed)")
    parser.add_argument("--rotation", default="qr", help="rotation kind (qr or hadamard)")
    parser.add_argument("--norm-correction", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    lm, tokenizer, path = load_model(args.model)
    text_path = args.text or path / "heldout.txt"
    if not text_path.is_file():
        parser.error(f"no evaluation text at {text_path}: give one with --text")
    windows = token_windows(tokenizer, text_path.read_text(), args.window)
    num_layers = lm.config.num_hidden_layers
    schedules = []
    for k, v in args.uniform:
        name = f"uniform {k:g}" if k == v else f"uniform K {k:g} / V {v:g}"
        schedules.append(BitSchedule.uniform(num_layers, k, v_bits=v, variant=args.variant, name=name))
    schedules += [BitSchedule.load(name, num_layers=num_layers) for name in args.schedule]
    rows = evaluate_schedules(
        lm,
        windows,
        schedules,
        seed=args.seed,
        rotation=args.rotation,
        norm_correction=args.norm_correction,
        show_progress=True,
    )
    print(f"{args.model}: {rows[0].tokens} scored tokens of {text_path.name}, windows of {args.window}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
