"""Output tokens/s through the server, TurboQuant vs SGLang's bf16 KV cache: `python -m tq_serve.bench serve`.

Each setting gets its own `python -m tq_serve` (bf16 = `--kv-cache bf16`: SGLang's own backend, torch_native on a CPU),
started the same way in the same run. At each concurrency level C, C clients each send requests back to back
(distinct prompts, greedy, `ignore_eos` so every request decodes exactly --output-tokens); output tokens/s = all
generated tokens / wall time from the first request to the last reply. One warm-up request precedes the timing.

`--prompt-tokens N` measures serving at long prompts: each request is N random token ids (distinct per request, so
the prefix cache cannot skip its prefill), streamed, and the rows add the time to first token and the decode rate
(tokens after the first / time after the first, times the concurrency). The bundled model's context is 1024
tokens, so the servers then run a copy of its shape with random weights and a context of N + the output, built in
a temporary directory at bench time: speed does not depend on the weights, and the copy says nothing of quality.

`--rounds R` repeats the whole sequence (bf16, then each TurboQuant setting) R times. A single stream's rate on a
small machine moves with where the server's processes land, from one server start to the next, by more than the
caches differ; so each row's ratio is against the bf16 server of its own round, and `summary` holds, per setting,
pool and concurrency, the median rate and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
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


async def _stream_one(http: httpx.AsyncClient, url: str, input_ids: list[int], output_tokens: int) -> dict:
    """One streamed request: its output tokens, time to first token and decode time after it."""
    start = time.perf_counter()
    first = last = None
    tokens = 0
    body = {
        "input_ids": input_ids,
        "stream": True,
        "sampling_params": {"max_new_tokens": output_tokens, "temperature": 0, "ignore_eos": True},
    }
    async with http.stream("POST", f"{url}/generate", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            tokens = json.loads(line[5:])["meta_info"]["completion_tokens"]
    return {"tokens": tokens, "ttft": (first or start) - start, "decode_s": (last or start) - (first or start)}


async def _measure_long(url: str, concurrency: int, requests_per_client: int, output_tokens: int, prompt: int) -> dict:
    rng = random.Random(concurrency)
    vocab = 4000  # below tq-tiny's 4096, past its special tokens

    def ids() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(prompt)]

    async def client() -> list[dict]:
        return [await _stream_one(http, url, ids(), output_tokens) for _ in range(requests_per_client)]

    async with httpx.AsyncClient(timeout=None) as http:
        await _stream_one(http, url, ids(), output_tokens)  # warm-up
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(concurrency))) for r in rs]
        seconds = time.perf_counter() - start
    generated = sum(r["tokens"] for r in results)
    per_request = [(r["tokens"] - 1) / r["decode_s"] for r in results if r["decode_s"] > 0]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "prompt_tokens": prompt,
        "output_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "ttft_s": statistics.mean(r["ttft"] for r in results),
        "decode_tokens_per_s": concurrency * statistics.mean(per_request),
    }


def long_context_copy(model_dir: Path, context: int, out: Path) -> Path:
    """A copy of the model at `model_dir` with random weights (each tensor drawn with its own std, seeded) and
    max_position_embeddings = `context`, written to `out`: same shapes, so the same cost per token."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = context
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (model_dir / name).exists():
            (out / name).write_bytes((model_dir / name).read_bytes())
    gen = torch.Generator().manual_seed(0)
    weights = load_file(model_dir / "model.safetensors")
    random_weights = {}
    for name, t in weights.items():
        t32 = t.float()
        if name.endswith("norm.weight"):  # RMSNorm gains: keep them, random gains would only rescale
            random_weights[name] = t
        else:
            random_weights[name] = (torch.randn(t.shape, generator=gen) * t32.std()).to(t.dtype)
    save_file(random_weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


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
        rows = []
        for c in args.concurrency:
            if args.prompt_tokens:
                measured = _measure_long(url, c, args.requests_per_client, args.output_tokens, args.prompt_tokens)
            else:
                measured = _measure(url, c, args.requests_per_client, args.output_tokens)
            rows.append({"setting": setting.name, "pool_tokens": pool_tokens, **asyncio.run(measured)})
        return rows


def with_ratios(rows: list[dict], round_: int, streamed: bool) -> list[dict]:
    """Tag one round's rows and give each its ratio to that round's bf16 row at the same concurrency."""
    bf16 = {r["concurrency"]: r for r in rows if r["setting"] == BF16.name}
    for row in rows:
        row["round"] = round_
        row["vs_bf16"] = row["tokens_per_s"] / bf16[row["concurrency"]]["tokens_per_s"]
        if streamed:
            row["decode_vs_bf16"] = row["decode_tokens_per_s"] / bf16[row["concurrency"]]["decode_tokens_per_s"]
    return rows


SUMMARY_COLUMNS = ("setting", "pool_tokens", "concurrency", "tokens_per_s", "vs_bf16", "decode_tokens_per_s",
                   "decode_vs_bf16")  # fmt: skip


def summarise(rows: list[dict]) -> list[dict]:
    """Per (setting, pool, concurrency), in first-seen order: the median over rounds of each rate and ratio."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["pool_tokens"], row["concurrency"]), []).append(row)
    summary = []
    for (setting, pool_tokens, concurrency), group in groups.items():
        entry = {"setting": setting, "pool_tokens": pool_tokens, "concurrency": concurrency, "rounds": len(group)}
        for key in SUMMARY_COLUMNS[3:]:
            if key in group[0]:
                entry[key] = statistics.median(r[key] for r in group)
                entry[f"{key}_per_round"] = [r[key] for r in group]
        summary.append(entry)
    return summary


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
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        help="long prompts of this many random tokens, streamed (TTFT, decode rate), served by a random-weight "
        "copy of the model with a context long enough (built in a temporary directory)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat bf16 and every setting this many times (ratios per round)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    try:
        settings = [BF16] + [KVSetting(bits=parse_bits(b), variant=args.variant) for b in args.bits]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    selected = model_flags(args.model, args.model_path)
    with tempfile.TemporaryDirectory() as logs:
        if args.prompt_tokens:
            from tq_serve.registry import ModelRegistry

            source = ModelRegistry.load().resolve(args.model, args.model_path).path
            context = args.prompt_tokens + args.output_tokens + 64
            copy = long_context_copy(source, context, Path(logs) / f"{source.name}-random-{context}")
            selected = model_flags(str(copy), None)
        rows = []
        try:
            for round_ in range(args.rounds):
                measured = run_setting(selected, BF16, args, Path(logs), args.pool_tokens[0])
                for setting in settings[1:]:
                    for pool_tokens in args.pool_tokens:
                        measured += run_setting(selected, setting, args, Path(logs), pool_tokens)
                rows += with_ratios(measured, round_, bool(args.prompt_tokens))
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    config = {k: v for k, v in vars(args).items() if k not in ("json", "out")}
    extra = {"summary": summarise(rows)} if args.rounds > 1 else {}
    report = write_report(args.out, "serve", config, rows, **extra)
    columns = {
        "round": "d",
        "setting": "",
        "pool_tokens": "d",
        "concurrency": "d",
        "output_tokens": ",d",
        "seconds": ".1f",
        "tokens_per_s": ".1f",
        "vs_bf16": ".2f",
    }
    if args.prompt_tokens:
        columns |= {"ttft_s": ".2f", "decode_tokens_per_s": ".1f", "decode_vs_bf16": ".2f"}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(table(rows, columns))
    if args.rounds > 1:
        print(f"\nmedian of {args.rounds} rounds:")
        print(table(report["summary"], {k: v for k, v in columns.items() if k in SUMMARY_COLUMNS}))
    return 0
