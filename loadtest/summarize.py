"""Summaries of load-test runs, and two runs side by side.

    python loadtest/summarize.py summarize loadtest/results/20260101-120000-mixed
    python loadtest/summarize.py compare RUN_A RUN_B        # a results dir or its summary.json, e.g. 4-bit vs bf16

`summarize` reads what the locustfile wrote into a results dir (run.json: options and the test's start and end;
requests.jsonl: one line per finished request) and writes summary.json and summary.txt next to them. Percentiles are
exact (linear interpolation between order statistics) over every request of the run. Rates divide by the test's
wall time, spawn ramp included. ITL is each request's mean gap between tokens; its percentiles are over requests.
Requests that locust cut off at the end of the test (after --stop-timeout) are counted as interrupted: neither
completed nor failed.

Standard library only, and no locust: tests import this module in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

PERCENTILES = (50, 90, 99)
METRICS = {"ttft_ms": "TTFT ms", "itl_ms": "ITL ms", "e2e_ms": "E2E ms"}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of `values` (sorted or not), interpolated linearly like numpy's default."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    stats = {f"p{p}": round(percentile(values, p), 3) for p in PERCENTILES}
    return {"n": len(values), **stats, "mean": round(sum(values) / len(values), 3), "max": round(max(values), 3)}


def _totals(records: list[dict], duration_s: float) -> dict:
    ok = [r for r in records if r["ok"]]
    interrupted = sum(1 for r in records if r.get("interrupted"))
    output_tokens = sum(r["output_tokens"] for r in ok)
    prompts = [r["prompt_tokens"] for r in ok if r.get("prompt_tokens") is not None]
    reported = [r for r in ok if r.get("cached_tokens") is not None and r.get("prompt_tokens")]
    cached = sum(r["cached_tokens"] for r in reported) / sum(r["prompt_tokens"] for r in reported) if reported else None
    return {
        "requests": {
            "completed": len(ok),
            "failed": len(records) - len(ok) - interrupted,
            "interrupted": interrupted,
            "per_s": round(len(ok) / duration_s, 3),
        },
        "output_tokens": {
            "total": output_tokens,
            "per_s": round(output_tokens / duration_s, 3),
            "mean": round(output_tokens / len(ok), 3) if ok else 0,
        },
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "cached_prompt_fraction": None if cached is None else round(cached, 4),
        **{key: distribution([r[key] for r in ok if r.get(key) is not None]) for key in METRICS},
    }


def summarize(run: dict, records: list[dict], label: str = "") -> dict:
    """Totals, percentiles and failure reasons of one run, overall and per workload."""
    duration_s = max(run["end_time"] - run["start_time"], 1e-9)
    settings = {key: value for key, value in run.items() if key not in ("start_time", "end_time")}
    workloads = sorted({r["workload"] for r in records})
    return {
        "label": label,
        "run": settings | {"duration_s": round(duration_s, 3)},
        **_totals(records, duration_s),
        "failures": dict(Counter(r["error"] for r in records if not (r["ok"] or r.get("interrupted"))).most_common()),
        "by_workload": {w: _totals([r for r in records if r["workload"] == w], duration_s) for w in workloads},
    }


def summarize_dir(results_dir: Path, label: str = "") -> dict:
    """Summarize a results dir and write summary.json and summary.txt into it."""
    results_dir = Path(results_dir)
    run = json.loads((results_dir / "run.json").read_text())
    lines = (results_dir / "requests.jsonl").read_text().splitlines()
    summary = summarize(run, [json.loads(line) for line in lines if line.strip()], label or results_dir.name)
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results_dir / "summary.txt").write_text(format_summary(summary) + "\n")
    return summary


def load_summary(path: Path) -> dict:
    """A summary.json, or the one inside a results dir."""
    path = Path(path)
    return json.loads((path / "summary.json" if path.is_dir() else path).read_text())


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict) -> str:
    run = summary["run"]
    server = run.get("server") or {}
    requests, tokens = summary["requests"], summary["output_tokens"]
    lines = [
        f"{summary['label']}: workload {run['workload']}, {run['users']} users, {run['duration_s']:.1f} s, "
        f"model {server.get('model', '?')} at {run['host']}",
        f"requests  {requests['completed']} completed, {requests['failed']} failed, {requests['per_s']:.2f} req/s"
        + (f" ({requests['interrupted']} interrupted by the end of the test)" if requests["interrupted"] else ""),
        f"output    {tokens['total']} tokens, {tokens['per_s']:.1f} tok/s, {tokens['mean']:.1f} per request",
    ]
    if summary["prompt_tokens_mean"] is not None:
        cached = summary["cached_prompt_fraction"]
        from_cache = "" if cached is None else f", {cached:.0%} of prompt tokens from the prefix cache"
        lines.append(f"prompts   {summary['prompt_tokens_mean']:.0f} tokens on average{from_cache}")
    lines.append(f"{'':10}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'n':>7}")
    for key, title in METRICS.items():
        dist = summary[key]
        cells = "".join(f"{_number(dist.get(stat)):>10}" for stat in ("p50", "p90", "p99", "mean"))
        lines.append(f"{title:10}{cells}{dist['n']:>7}")
    if len(summary["by_workload"]) > 1:
        lines.append("by workload (p50 ms)")
        for workload, part in summary["by_workload"].items():
            cached = part["cached_prompt_fraction"]
            lines.append(
                f"  {workload:14}{part['requests']['completed']:>5} ok{part['requests']['failed']:>4} failed"
                f"  TTFT {_number(part['ttft_ms'].get('p50')):>8}  ITL {_number(part['itl_ms'].get('p50')):>7}"
                f"  E2E {_number(part['e2e_ms'].get('p50')):>8}" + ("" if cached is None else f"  cached {cached:.0%}")
            )
    if summary["failures"]:
        lines.append("failures")
        lines += [f"  {count:>5}  {reason}" for reason, count in summary["failures"].items()]
    return "\n".join(lines)


def _compare_rows(summary: dict) -> dict[str, float | None]:
    rows = {
        "requests completed": summary["requests"]["completed"],
        "requests failed": summary["requests"]["failed"],
        "requests/s": summary["requests"]["per_s"],
        "output tokens/s": summary["output_tokens"]["per_s"],
    }
    for key, title in METRICS.items():
        for p in PERCENTILES:
            rows[f"{title.split()[0]} p{p} ms"] = summary[key].get(f"p{p}")
    return rows


def format_compare(a: dict, b: dict) -> str:
    """Two summaries side by side; the last column is B / A."""
    rows_a, rows_b = _compare_rows(a), _compare_rows(b)
    width = max(12, len(a["label"]), len(b["label"])) + 2
    lines = [
        f"{'':20}{a['label']:>{width}}{b['label']:>{width}}{'B/A':>8}",
        f"{'workload':20}{a['run']['workload']:>{width}}{b['run']['workload']:>{width}}",
        f"{'users':20}{a['run']['users']:>{width}}{b['run']['users']:>{width}}",
    ]
    for name, value_a in rows_a.items():
        value_b = rows_b[name]
        ratio = f"{value_b / value_a:.2f}x" if value_a and value_b is not None and "failed" not in name else ""
        digits = {"requests completed": 0, "requests failed": 0, "requests/s": 2}.get(name, 1)
        lines.append(
            f"{name:20}{_number(value_a, digits):>{width}}{_number(value_b, digits):>{width}}{ratio:>8}".rstrip()
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python loadtest/summarize.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("summarize", help="write summary.json and summary.txt for a results dir")
    one.add_argument("results_dir", type=Path)
    one.add_argument("--label", default="", help="name of the run in summaries (default: the dir's name)")
    two = commands.add_parser("compare", help="print two summaries side by side")
    two.add_argument("a", type=Path, help="results dir or summary.json")
    two.add_argument("b", type=Path, help="results dir or summary.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "summarize":
            print(format_summary(summarize_dir(args.results_dir, args.label)))
        else:
            print(format_compare(load_summary(args.a), load_summary(args.b)))
    except (OSError, ValueError, KeyError) as err:
        print(f"summarize: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
