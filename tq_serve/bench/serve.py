"""Output tokens/s through the server, TurboQuant vs SGLang's bf16 KV cache: `python -m tq_serve.bench serve`.

Each setting gets its own `python -m tq_serve` (bf16 = `--kv-cache bf16`: SGLang's own backend, torch_native on a CPU),
started the same way in the same run. At each concurrency level C, C clients each send requests back to back
(distinct prompts, greedy, `ignore_eos` so every request decodes exactly --output-tokens); output tokens/s = all
generated tokens / wall time from the first request to the last reply. One warm-up request precedes the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tq_serve.bench.harness import BF16, KVSetting, model_flags, running_server, table, write_report
from tq_serve.kernels.layout import parse_bits

PROMPT = '''def merge_sorted(left: list[int], right: list[int]) -> list[int]:
    """Merge two sorted lists into one sorted list."""
    out, i, j = [], 0, 0
    while i < len(left) and j < len(right):
'''


async def _client(http: httpx.AsyncClient, url: str, prompts: list[str], output_tokens: int) -> int:
    generated = 0
    for prompt in prompts:
        reply = await http.post(
            f"{url}/generate",
            json={
                "text": prompt,
                "sampling_params": {"max_new_tokens": output_tokens, "temperature": 0, "ignore_eos": True},
            },
        )
        reply.raise_for_status()
        generated += reply.json()["meta_info"]["completion_tokens"]
    return generated


async def _measure(url: str, concurrency: int, requests_per_client: int, output_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None) as http:
        await _client(http, url, [PROMPT], output_tokens)  # warm-up
        prompts = [
            [f"# client {c} request {r}\n{PROMPT}" for r in range(requests_per_client)] for c in range(concurrency)
        ]
        start = time.perf_counter()
        counts = await asyncio.gather(*(_client(http, url, p, output_tokens) for p in prompts))
        seconds = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": concurrency * requests_per_client,
        "output_tokens": sum(counts),
        "seconds": seconds,
        "tokens_per_s": sum(counts) / seconds,
    }


def run_setting(model_args: list[str], setting: KVSetting, args, log_dir: Path, pool_tokens: int | None) -> list[dict]:
    pool_flags = [] if pool_tokens is None else ["--max-total-tokens", str(pool_tokens)]
    log = log_dir / f"serve-{setting.name}-{pool_tokens}.log"
    with running_server([*model_args, *setting.flags(), *pool_flags], log) as url:
        return [
            {
                "setting": setting.name,
                "pool_tokens": pool_tokens,
                **asyncio.run(_measure(url, c, args.requests_per_client, args.output_tokens)),
            }
            for c in args.concurrency
        ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tq-tiny", help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--model-path", help="local weights for the alias")
    parser.add_argument("--bits", nargs="+", default=["4"], help="TurboQuant bits to compare with bf16")
    parser.add_argument("--variant", default="mse", choices=["mse", "prod"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument(
        "--pool-tokens",
        type=int,
        nargs="+",
        default=[None],
        help="KV pool sizes (--max-total-tokens) to run TurboQuant at, e.g. 20000 400000: decode must not slow "
        "down with the pool (default: the server's)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve.json"))
    args = parser.parse_args(argv)
    try:
        settings = [BF16] + [KVSetting(bits=parse_bits(b), variant=args.variant) for b in args.bits]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    selected = model_flags(args.model, args.model_path)
    with tempfile.TemporaryDirectory() as logs:
        try:
            rows = run_setting(selected, BF16, args, Path(logs), args.pool_tokens[0])
            for setting in settings[1:]:
                for pool_tokens in args.pool_tokens:
                    rows += run_setting(selected, setting, args, Path(logs), pool_tokens)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    bf16 = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["setting"] == BF16.name}
    for row in rows:
        row["vs_bf16"] = row["tokens_per_s"] / bf16[row["concurrency"]]
    config = {k: v for k, v in vars(args).items() if k not in ("json", "out")}
    report = write_report(args.out, "serve", config, rows)
    columns = {
        "setting": "",
        "pool_tokens": "d",
        "concurrency": "d",
        "output_tokens": ",d",
        "seconds": ".1f",
        "tokens_per_s": ".1f",
        "vs_bf16": ".2f",
    }
    print(json.dumps(report, indent=1) if args.json else table(rows, columns))
    return 0
