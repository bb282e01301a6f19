"""What capacity does for users, at equal KV memory: `python -m tq_serve.bench capacity-win`.

Every KV setting gets the same KV budget in bytes: SGLang's bf16 pool of N tokens (`--max-total-tokens N`) against
a TurboQuant pool of the tokens those bytes hold (N * bf16 bytes per token // packed bytes per token, exact from the
layout). Each server then takes the same load: locust's `sessions` workload (loadtest/locustfile.py), multi-turn
conversations about documents drawn with Zipf popularity, every turn resending the document and the history so far.
Its working set (popular documents plus live histories) is sized to exceed the bf16 pool and to fit the packed one,
so the prefix cache decides how much of each prompt is recomputed. Per setting and budget:

    hit rate       prompt tokens served from the radix cache / prompt tokens (usage.prompt_tokens_details)
    TTFT           p50 / p90 / p99 over requests, request throughput, output tokens/s (loadtest/summarize.py)
    evicted        requests that found an earlier prefix gone: a later turn whose cache hit is short of the
                   previous turn's prompt, or a first turn on a document another request had already sent, with
                   less than half the prompt cached
    retractions    decoding requests SGLang retracted for lack of KV space (its "Retract requests" log lines)
    max running    the most requests decoding together in SGLang's batch log lines
    agreement      greedy completions of a fixed probe set (slices of the bundled calibration code, sent before the
                   load) against bf16's at the same budget: identical completions, and the mean share of bf16's
                   completion matched before the first difference

Writes JSON, a PNG (hit rate and TTFT p50 against KV memory, one line per setting) and a table. Needs the model on
this machine (the bundled tq-tiny by default) and locust; runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
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
from tq_serve.kernels.layout import KVLayout
from tq_serve.registry import REPO_ROOT, ModelNotFoundError, ModelRegistry, ModelShape

LOADTEST = REPO_ROOT / "loadtest" / "run.py"
CALIBRATION = REPO_ROOT / "configs" / "calibration" / "python_code.txt"
RETRACTED = re.compile(r"Retract requests\..*?#retracted_reqs: (\d+)")
RUNNING = re.compile(r"#running-req: (\d+)")
PROBE_TOKENS = 32


def bytes_per_token(shape: ModelShape, setting: KVSetting) -> int:
    """KV bytes of one token slot over the whole model, as SGLang's capacity computation charges it."""
    if setting.schedule is not None:
        from tq_serve.schedule import BitSchedule

        schedule = BitSchedule.load(setting.schedule).check_layers(shape.num_layers)
        layout = schedule.kv_layout(num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim)
    else:
        bits = 4 if setting == BF16 else setting.bits  # bf16 reads only bf16_bytes_per_token below
        layout = KVLayout.uniform(
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            bits=bits,
            variant=setting.variant,
        )
    return layout.bf16_bytes_per_token if setting == BF16 else layout.bytes_per_token


def workload_flags(args: argparse.Namespace) -> list[str]:
    """The locust options of the sessions workload, shared by the load and the probes' documents."""
    return [
        "--documents", str(args.documents), "--document-tokens", str(args.document_tokens),
        "--turns", str(args.turns), "--prompt-tokens", str(args.question_tokens),
        "--output-tokens", str(args.output_tokens), "--zipf", str(args.zipf), "--seed", str(args.seed),
    ]  # fmt: skip


def run_load(url: str, args: argparse.Namespace, out: Path, label: str) -> tuple[dict, list[dict]]:
    """locust (loadtest/run.py, its own process) against `url`: the summary and the per-request records."""
    command = [
        sys.executable, str(LOADTEST), "--host", url, "--workload", "sessions", "--api", "completions",
        "--users", str(args.users), "--spawn-rate", str(args.users), "--duration", "60m",
        "--max-requests", str(args.requests), "--out", str(out), "--label", label, *workload_flags(args),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"the load test against {label} did not run:\n{(done.stdout + done.stderr)[-3000:]}")
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return json.loads(summary_file.read_text()), records


def evicted_prefixes(records: list[dict]) -> int:
    """Requests that found a prefix evicted which an earlier request had left in the cache (see the docstring)."""
    done = sorted((r for r in records if r.get("ok")), key=lambda r: r["time"])
    previous: dict[int, dict] = {}  # user -> their last completed request
    seen_documents: set[int] = set()
    evicted = 0
    for r in done:
        cached, prompt = r.get("cached_tokens") or 0, r.get("prompt_tokens") or 0
        if r["turn"] > 0 and r["user"] in previous:
            evicted += cached < previous[r["user"]]["prompt_tokens"]
        elif r["turn"] == 0 and r["document"] in seen_documents:
            evicted += cached < prompt / 2
        previous[r["user"]] = r
        seen_documents.add(r["document"])
    return evicted


def server_log_counts(log: Path) -> dict:
    text = log.read_text(errors="replace")
    running = [int(n) for n in RUNNING.findall(text)]
    return {"retractions": sum(int(n) for n in RETRACTED.findall(text)), "max_running": max(running, default=None)}


def probe_prompts(count: int, chars: int = 600) -> list[str]:
    """A fixed probe set: `count` slices of the bundled calibration code, each cut at a line end."""
    text = CALIBRATION.read_text()
    step = max(chars, (len(text) - chars) // max(count, 1))
    slices = [text[i * step : i * step + chars] for i in range(count)]
    return [s[: s.rfind("\n") + 1] or s for s in slices]


def greedy_completions(url: str, prompts: list[str]) -> list[str]:
    out = []
    with httpx.Client(timeout=600) as http:
        model = http.get(f"{url}/v1/models").json()["data"][0]["id"]
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": PROBE_TOKENS, "temperature": 0}
            reply = http.post(f"{url}/v1/completions", json=body)
            reply.raise_for_status()
            out.append(reply.json()["choices"][0]["text"])
    return out


def agreement(got: list[str], want: list[str]) -> dict:
    """Identical completions, and the mean share of each reference completion matched before the first difference."""
    shares = []
    for a, b in zip(got, want, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        shares.append(same / len(b) if b else 1.0)
    return {
        "probes_identical": sum(a == b for a, b in zip(got, want, strict=True)),
        "probe_prefix_match": sum(shares) / len(shares) if shares else None,
    }


ROUTERS = {"affinity": [], "power-of-two": ["--affinity-prefix-chars", "0"]}


def run_setting(
    model_args: list[str],
    setting: KVSetting,
    pool_tokens: int,
    args: argparse.Namespace,
    work: Path,
    probes: list[str],
    router: str | None = None,
) -> tuple[dict, list[str]]:
    """One server (or, with a router, args.replicas engines behind Ray Serve) under the load; its row."""
    name = f"{setting.name}-{pool_tokens}" + (f"-{args.replicas}x-{router}" if router else "")
    log = work / f"{name}.log"
    flags = [*model_args, *setting.flags(), "--max-total-tokens", str(pool_tokens)]
    if router:
        flags += ["--replicas", str(args.replicas), *ROUTERS[router]]
    with running_server(flags, log) as url:
        completions = greedy_completions(url, probes)
        summary, records = run_load(url, args, work / name, name)
    requests = summary["requests"]
    row = {
        "setting": setting.name,
        "replicas": args.replicas if router else 1,
        "router": router,
        "pool_tokens": pool_tokens,
        "completed": requests["completed"],
        "failed": requests["failed"] + requests["interrupted"],
        "failures": summary["failures"],
        "hit_rate": summary["cached_prompt_fraction"],
        **{f"ttft_p{p}_ms": summary["ttft_ms"].get(f"p{p}") for p in (50, 90, 99)},
        "requests_per_s": requests["per_s"],
        "output_tokens_per_s": summary["output_tokens"]["per_s"],
        "evicted_prefixes": evicted_prefixes(records),
        **server_log_counts(log),
    }
    return row, completions


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hit, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = sorted((r for r in rows if r["setting"] == setting and r["router"] is None), key=lambda r: r["kv_mib"])
        x = [r["kv_mib"] for r in mine]
        hit.plot(x, [100 * (r["hit_rate"] or 0) for r in mine], marker="o", label=setting)
        ttft.plot(x, [r["ttft_p50_ms"] for r in mine], marker="o", label=setting)
    hit.set(xlabel="KV memory (MiB)", ylabel="prompt tokens from the prefix cache (%)", title="prefix-cache hit rate")
    ttft.set(xlabel="KV memory (MiB)", ylabel="TTFT p50 (ms)", title="time to first token", yscale="log")
    for ax in (hit, ttft):
        ax.grid(alpha=0.3)
    hit.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_with_bf16(rows: list[dict]) -> None:
    """Each row's hit rate and TTFT p50 as ratios to bf16's single engine at the same KV memory (replica runs
    included: they have no bf16 run of their own); None where that bf16 row is missing or zero."""
    bf16 = {r["kv_mib"]: r for r in rows if r["setting"] == BF16.name and r["router"] is None}
    for row in rows:
        peer = bf16.get(row["kv_mib"])
        for key, ratio in (("hit_rate", "hit_rate_vs_bf16"), ("ttft_p50_ms", "ttft_p50_vs_bf16")):
            row[ratio] = row[key] / peer[key] if peer and peer[key] else None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench capacity-win", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tq-tiny", help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--model-path", type=Path, help="local weights for the alias")
    parser.add_argument(
        "--bf16-pool-tokens", type=int, nargs="+", default=[1200, 2400],
        help="KV budgets, each given as the tokens a bf16 pool of that many bytes holds",
    )  # fmt: skip
    parser.add_argument("--bits", nargs="+", default=["4", "3", "2.5"], help="TurboQuant settings (mse)")
    parser.add_argument("--schedules", nargs="*", default=["tq-tiny-3.0"], help="bit schedules (configs/schedules/)")
    parser.add_argument("--users", type=int, default=8, help="concurrent conversations")
    parser.add_argument("--requests", type=int, default=96, help="requests per setting and budget")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--document-tokens", type=int, default=300)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--output-tokens", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, default=8, help="greedy probes compared with bf16")
    parser.add_argument(
        "--replicas", type=int, default=1,
        help="above 1: --replica-setting at the first budget also with this many engines behind Ray Serve, routed "
        "by the capacity-aware prefix affinity and by plain power-of-two choice (each engine gets the budget)",
    )  # fmt: skip
    parser.add_argument("--replica-setting", default="tq4-mse", help="the setting the replica runs use")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("bench-results/capacity-win.json"))
    args = parser.parse_args(argv)
    try:
        shape = ModelRegistry.load().shape(args.model, args.model_path)
        settings = kv_settings(args.bits, ["mse"]) + schedule_settings(args.schedules)
        cells = {s.name: bytes_per_token(shape, s) for s in settings}
    except (ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model_args = model_flags(args.model, args.model_path)
    probes = probe_prompts(args.probes)
    load_before = os.getloadavg()
    rows = []

    def save() -> dict:
        # Written after every row, so an hour of runs survives a failure late in the list.
        compare_with_bf16(rows)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("json", "out")}
        # A busy machine slows every setting; the load average says how busy it was (1, 5, 15 minutes).
        config |= {"load_average_before": load_before, "load_average_after": os.getloadavg()}
        return write_report(args.out, "capacity-win", config | {"shape": vars(shape)}, rows)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            for bf16_tokens in args.bf16_pool_tokens:
                budget = bf16_tokens * cells[BF16.name]
                reference = None
                for setting in settings:
                    pool_tokens = budget // cells[setting.name]
                    routed = args.replicas > 1 and setting.name == args.replica_setting
                    routed = routed and bf16_tokens == args.bf16_pool_tokens[0]
                    for router in [None] + (list(ROUTERS) if routed else []):
                        row, completions = run_setting(model_args, setting, pool_tokens, args, work, probes, router)
                        reference = completions if setting == BF16 and router is None else reference
                        row |= {"kv_mib": budget / 2**20, "bytes_per_token": cells[setting.name]}
                        row |= agreement(completions, reference)
                        rows.append(row)
                        save()
                        print(table([row], COLUMNS), flush=True)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    report = save()
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(report, indent=1) if args.json else table(rows, COLUMNS))
    return 0


COLUMNS = {
    "kv_mib": ".1f",
    "setting": "",
    "replicas": "d",
    "router": "",
    "pool_tokens": ",d",
    "completed": "d",
    "failed": "d",
    "hit_rate": ".1%",
    "ttft_p50_ms": ".0f",
    "ttft_p90_ms": ".0f",
    "ttft_p99_ms": ".0f",
    "requests_per_s": ".2f",
    "output_tokens_per_s": ".1f",
    "evicted_prefixes": "d",
    "retractions": "d",
    "max_running": "d",
    "probes_identical": "d",
}
