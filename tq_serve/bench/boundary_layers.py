"""Do raw boundary layers lower the KV cache's KL? `python -m tq_serve.bench boundary-layers`.

vLLM's TurboQuant keeps the first and last two layers uncompressed. `--kv-boundary-layers N` does the same here
(tq_serve.settings.boundary_schedule) and `python -m tq_serve.tune_schedule --boundary-layers N` tunes the rest
around them. This measures, offline (tq_serve.schedule_eval: the model's own attention with each layer's K/V
round-tripped through the quantizer of its bits, float32 weights), the next-token KL to a bf16 cache of:

- uniform b bits, and the first/last N layers raw with the others at b (what the boundary layers buy at the same
  compressed width, and what they cost in bytes per token);
- uniform b+1 bits: another way to spend bytes.

Models: tq-tiny (trained, 8 layers) and tiny random-weight stand-ins of other families (tq_serve.models.tiny_arch,
8 layers): on random weights no layer is special, so their figures say little about a trained model of that family.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import asdict
from pathlib import Path

from tq_serve.bench.harness import table, write_report
from tq_serve.registry import REPO_ROOT
from tq_serve.schedule import BitSchedule

HELDOUT = REPO_ROOT / "models" / "tq-tiny" / "heldout.txt"


def schedules(num_layers: int, bits: float, boundary: list[int]) -> list[BitSchedule]:
    from tq_serve.settings import boundary_schedule

    out = [BitSchedule.uniform(num_layers, bits, name=f"uniform-{bits:g}")]
    out += [boundary_schedule(num_layers, bits, n) for n in boundary if 2 * n < num_layers]
    if bits + 1 <= 4:
        out.append(BitSchedule.uniform(num_layers, bits + 1, name=f"uniform-{bits + 1:g}"))
    return out


def measure(model: str, bits: list[float], boundary: list[int], max_tokens: int) -> list[dict]:
    from tq_serve.schedule_eval import evaluate_schedules, load_model, token_windows

    lm, tokenizer, _ = load_model(model)
    windows = token_windows(tokenizer, HELDOUT.read_text(), 512, max_tokens)
    n = lm.config.num_hidden_layers
    rows = []
    for b in bits:
        quality = evaluate_schedules(lm, windows, schedules(n, b, boundary))
        rows += [{"model": Path(model).name, "bits": b, **asdict(q)} for q in quality[1:]]
    return rows


def main(argv: list[str]) -> int:
    from tq_serve.models.tiny_arch import ARCHS, build

    parser = argparse.ArgumentParser(
        prog="python -m tq_serve.bench boundary-layers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--archs", nargs="*", choices=tuple(ARCHS), default=["qwen3"])
    parser.add_argument("--layers", type=int, default=8, help="layers of the tiny stand-ins")
    parser.add_argument("--bits", type=float, nargs="+", default=[3, 2])
    parser.add_argument("--boundary", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "cpu" / "boundary_layers.json")
    args = parser.parse_args(argv)
    models = ["tq-tiny"]
    cache = Path(tempfile.gettempdir()) / "tq_tiny_arch"
    models += [str(build(a, cache / f"{a}-{args.layers}l", num_layers=args.layers)) for a in args.archs]
    rows = [row for model in models for row in measure(model, args.bits, args.boundary, args.max_tokens)]
    write_report(args.out, "boundary_layers", vars(args) | {"out": str(args.out), "models": models}, rows)
    print(
        table(
            rows,
            {
                "model": "",
                "label": "",
                "average_bits": ".3g",
                "bytes_per_token": "d",
                "kl_to_bf16": ".5f",
                "agreement": ".3f",
            },
        )
    )
    return 0
