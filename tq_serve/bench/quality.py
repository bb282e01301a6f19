"""Quality through the serving path, bf16 vs TurboQuant: `python -m tq_serve.bench quality`.

For each setting a `python -m tq_serve` server scores the same held-out text chunks (default: heldout.txt of the
model directory, never seen in training) with SGLang's input logprobs (`return_logprob`, `logprob_start_len=0`,
`top_logprobs_num=1`), so the K/V of every chunk go through the packed cache exactly as when serving:
- perplexity = exp(mean negative log-likelihood of each token given its prefix);
- greedy agreement = share of positions whose most likely next token equals bf16's (teacher-forced, same prefixes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
from pathlib import Path

import httpx

from tq_serve.bench.harness import (
    BF16,
    KVSetting,
    kv_settings,
    model_flags,
    running_server,
    schedule_settings,
    table,
    write_report,
)
from tq_serve.registry import ModelNotFoundError, ModelRegistry


def chunks_of(text: str, chunk_chars: int, max_chunks: int) -> list[str]:
    """Whole lines, about chunk_chars per chunk, the first max_chunks of them."""
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current) >= chunk_chars:
            out.append(current)
            current = ""
            if len(out) == max_chunks:
                break
    return out or [current]


async def _score(http: httpx.AsyncClient, url: str, chunk: str) -> tuple[list[float], list[int]]:
    """Log-likelihood of each token after the first, and the argmax token at each of those positions."""
    reply = await http.post(
        f"{url}/generate",
        json={
            "text": chunk,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 1,
        },
    )
    reply.raise_for_status()
    meta = reply.json()["meta_info"]
    logprobs = [entry[0] for entry in meta["input_token_logprobs"][1:]]
    argmax = [top[0][1] for top in meta["input_top_logprobs"][1:]]
    return logprobs, argmax


async def _score_all(url: str, chunks: list[str]) -> list[tuple[list[float], list[int]]]:
    async with httpx.AsyncClient(timeout=None) as http:
        return await asyncio.gather(*(_score(http, url, c) for c in chunks))


def run_setting(model_args: list[str], setting: KVSetting, chunks: list[str], log_dir: Path):
    with running_server([*model_args, *setting.flags()], log_dir / f"quality-{setting.name}.log") as url:
        return asyncio.run(_score_all(url, chunks))


def compare(scored, reference) -> dict:
    logprobs = [lp for chunk, _ in scored for lp in chunk]
    agree = [
        a == b for (_, ours), (_, ref) in zip(scored, reference, strict=True) for a, b in zip(ours, ref, strict=True)
    ]
    return {
        "tokens": len(logprobs),
        "perplexity": math.exp(-sum(logprobs) / len(logprobs)),
        "greedy_agreement": sum(agree) / len(agree),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tq-tiny", help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--model-path", type=Path, help="local weights for the alias")
    parser.add_argument("--text", type=Path, help="held-out text (default: heldout.txt in the model directory)")
    parser.add_argument("--bits", nargs="+", default=["2", "3", "4"])
    parser.add_argument("--variants", nargs="+", default=["mse", "prod"], choices=["mse", "prod"])
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=[],
        metavar="SCHEDULE",
        help="per-layer bit schedules (files or names in configs/schedules/), compared with the uniform settings",
    )
    parser.add_argument("--chunk-chars", type=int, default=1500, help="characters per scored chunk (whole lines)")
    parser.add_argument("--max-chunks", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("bench-results/quality.json"))
    args = parser.parse_args(argv)
    try:
        model = ModelRegistry.load().resolve(args.model, args.model_path)
        text_file = args.text or model.path / "heldout.txt"
        chunks = chunks_of(text_file.read_text(), args.chunk_chars, args.max_chunks)
        settings = kv_settings(args.bits, args.variants) + schedule_settings(args.schedules)
    except (ModelNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    selected = model_flags(args.model, args.model_path)
    with tempfile.TemporaryDirectory() as logs:
        try:
            scores = {s.name: run_setting(selected, s, chunks, Path(logs)) for s in settings}
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    reference = scores[BF16.name]
    rows = [
        {"setting": s.name, "bits": s.bits, "variant": s.variant, **compare(scores[s.name], reference)}
        for s in settings
    ]
    for row in rows:
        row["ppl_vs_bf16"] = row["perplexity"] / rows[0]["perplexity"]
    config = {"model": args.model, "text": str(text_file), "chunks": len(chunks), "chunk_chars": args.chunk_chars}
    report = write_report(args.out, "quality", config, rows)
    columns = {"setting": "", "tokens": ",d", "perplexity": ".3f", "ppl_vs_bf16": ".4f", "greedy_agreement": ".4f"}
    print(json.dumps(report, indent=1) if args.json else table(rows, columns))
    return 0
