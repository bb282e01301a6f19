"""`make soak`: hold a server's KV pool at pressure for a bounded time and check that nothing is lost.

    python loadtest/soak.py --duration 10m --pool-tokens 2048 --users 16 --out /tmp/soak
    python loadtest/soak.py --duration 90s --sample loadtest/samples/soak-cpu-tq-tiny.json

It starts `python -m tq_serve` with a small pool (`--max-total-tokens`), Prometheus metrics and batch-invariant CPU
kernels, SGLang's strict idle check (a pool whose slots do not add up when idle stops the scheduler), and SGLang's
admission estimate of output tokens started where it decays to on a long-running server (--new-token-ratio). Then:

1. before: the pool's slots (from /metrics) and the greedy answer to a fixed probe prompt;
2. load: locust's `mixed` workload (short prompts, one long shared system prompt, prompts near the context length,
   every answer --output-tokens long) with more users than the pool holds, for --duration (loadtest/run.py);
   meanwhile, every --probe-interval, the probe again (it must answer the same tokens: slots reused after a
   retraction or an eviction must not leak into another request) and one prompt longer than the context, which the
   server must refuse with 400 (the intended rejections);
3. after: wait until the server is idle; every slot is free or held by the radix cache; after /flush_cache every slot
   is free; the probe answers the same once more.

It reports requests sent / completed / failed by reason, retractions and evicted tokens (SGLang's counters, and its
log's retraction lines), peak pool use, the pool before and after, and the probes; writes summary.json and
summary.txt into --out, and with --sample copies the summary there. Exit status 0 only when every check holds.
HTTP and subprocesses only: like the rest of loadtest/, nothing here imports tq_serve or locust.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 900
IDLE_TIMEOUT_S = 180
# SGLang republishes its pool gauges while idle every 30 s.
GAUGE_REFRESH_TIMEOUT_S = 90
PROBE_PROMPT = (
    "import os\n\n\ndef list_python_files(root):\n"
    '    """Return the paths of the Python files under root, sorted."""\n'
    "    found = []\n    for directory, _, names in os.walk(root):\n"
)
PROBE_TOKENS = 48
# Far beyond any context tq-tiny or a test model has, in characters of code (several characters per token).
OVERLONG_PROMPT = "def f(x):\n    return x + 1\n\n" * 2000
SAMPLE_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
RETRACTION_LINE = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")


def parse_duration(text: str) -> float:
    """Seconds of a locust-style duration: 90, 90s, 10m, 1h30m."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not parts or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m)")
    hours, minutes, seconds = (int(g or 0) for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text as {name: value}, summed over label sets (one scheduler: one series per gauge)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match and not line.startswith("#"):
            name = match["name"]
            values[name] = values.get(name, 0.0) + float(match["value"])
    return values


class Server:
    """The server under test: started here (`python -m tq_serve`) or given by --host."""

    def __init__(self, url: str, proc: subprocess.Popen | None = None, log: Path | None = None):
        self.url = url
        self.proc = proc
        self.log = log

    @classmethod
    def start(cls, flags: list[str], log: Path, extra_env: dict[str, str] | None = None) -> Server:
        with socket.create_server(("127.0.0.1", 0)) as s:
            port = s.getsockname()[1]
        # A pool whose slots do not add up when idle (a leak or a double free) raises in the scheduler: loud, not a
        # warning in a long log.
        env = os.environ | {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"} | (extra_env or {})
        command = [sys.executable, "-m", "tq_serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
        with log.open("w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = cls(f"http://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"server did not start; its log ends:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        return server

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        response = requests.get(f"{self.url}/metrics", timeout=30)
        response.raise_for_status()
        return metric_values(response.text)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pool_state(m: dict[str, float]) -> dict:
    capacity = int(m["sglang:max_total_num_tokens"])
    available = int(m["sglang:kv_available_tokens"])
    evictable = int(m["sglang:kv_evictable_tokens"])
    state = {
        "capacity": capacity,
        "free": available,
        "radix_cached": evictable,
        "held_by_requests": capacity - available - evictable,
        "running": int(m.get("sglang:num_running_reqs", 0)),
        "queued": int(m.get("sglang:num_queue_reqs", 0)),
    }
    if "tq_kv_pool_slots_in_use" in m:
        state["tq_slots_in_use"] = int(m["tq_kv_pool_slots_in_use"])
    return state


def wait_for(server: Server, condition, timeout_s: float, what: str) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        if condition(m):
            return m
        if time.monotonic() > deadline or not server.alive():
            raise RuntimeError(f"{what} not within {timeout_s:.0f} s: {pool_state(m)}")
        time.sleep(2)


class Prober:
    """The probe and the over-long prompt, sent from a thread while the load runs."""

    def __init__(self, server: Server, model: str):
        self.server, self.model = server, model
        self.reference: str | None = None
        self.probes: list[dict] = []
        self.rejections: list[dict] = []
        self.stop = threading.Event()

    def probe(self, phase: str) -> dict:
        body = {"model": self.model, "prompt": PROBE_PROMPT, "max_tokens": PROBE_TOKENS, "temperature": 0}
        body["ignore_eos"] = True
        start = time.monotonic()
        try:
            response = requests.post(f"{self.server.url}/v1/completions", json=body, timeout=600)
            text = response.json()["choices"][0]["text"] if response.status_code == 200 else None
            error = None if text is not None else f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.RequestException, ValueError, KeyError, IndexError) as err:
            text, error = None, f"{type(err).__name__}: {err}"
        if self.reference is None and text is not None:
            self.reference = text
        record = {
            "phase": phase,
            "seconds": round(time.monotonic() - start, 2),
            "identical": text is not None and text == self.reference,
        }
        if error:
            record["error"] = error
        elif text != self.reference:
            record["text"] = text
        self.probes.append(record)
        return record

    def overlong(self) -> None:
        body = {"model": self.model, "prompt": OVERLONG_PROMPT, "max_tokens": 8}
        try:
            response = requests.post(f"{self.server.url}/v1/completions", json=body, timeout=600)
            record = {"status": response.status_code, "message": _message(response)}
        except requests.RequestException as err:
            record = {"status": None, "message": f"{type(err).__name__}: {err}"}
        self.rejections.append(record)

    def run(self, interval_s: float) -> None:
        while not self.stop.wait(interval_s):
            self.probe("during")
            self.overlong()


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    message = body.get("message") or (body.get("error") or {}).get("message") or body
    return str(message)[:200]


def run_load(args: argparse.Namespace, server: Server, out: Path) -> dict:
    command = [sys.executable, str(HERE / "run.py"), "--host", server.url, "--workload", "mixed"]
    command += ["--users", str(args.users), "--spawn-rate", str(args.users), "--duration", f"{int(args.duration)}s"]
    command += ["--out", str(out), "--label", "soak", "--output-tokens", str(args.output_tokens)]
    command += ["--stop-timeout", "300s", "--request-timeout", "600", "--seed", str(args.seed)]
    subprocess.run(command, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def scan_log(log: Path | None) -> dict:
    if log is None:
        return {}
    text = log.read_text(errors="replace")
    retracted = [int(n) for n in RETRACTION_LINE.findall(text)]
    return {
        "retraction_events": len(retracted),
        "retracted_requests": sum(retracted),
        "leak_reports": text.count("memory leak detected"),
        "tracebacks": text.count("Traceback (most recent call last)"),
    }


def soak(args: argparse.Namespace) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    flags = ["--max-total-tokens", str(args.pool_tokens), "--enable-metrics", "--batch-invariant-cpu"]
    # SGLang admits a request when the pool holds its prompt plus new_token_ratio x its max_tokens; the ratio starts
    # at 0.7 and decays towards 0.1 over 600 quiet decode steps, which a busy 2-core CPU takes many minutes to run.
    # Starting at the decayed value admits as SGLang does after that warm-up: decode outgrows the pool and SGLang
    # retracts requests, the path under test.
    ratio = {"SGLANG_INIT_NEW_TOKEN_RATIO": str(args.new_token_ratio)}
    server = Server(args.host) if args.host else Server.start(flags + args.server_flags, out / "server.log", ratio)
    try:
        model = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        prober = Prober(server, model)
        prober.probe("before")
        prober.overlong()
        start_metrics = wait_for(server, lambda m: m.get("sglang:num_running_reqs", 0) == 0, IDLE_TIMEOUT_S, "idle")
        before = pool_state(start_metrics)

        peak = {"held_by_requests": 0, "queued": 0, "running": 0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(5):
                try:
                    state = pool_state(server.metrics())
                except (requests.RequestException, KeyError):
                    continue
                for key in peak:
                    peak[key] = max(peak[key], state[key])

        threads = [threading.Thread(target=prober.run, args=(args.probe_interval,)), threading.Thread(target=sample)]
        for thread in threads:
            thread.start()
        load = run_load(args, server, out / "load")
        prober.stop.set()
        sampling.set()
        for thread in threads:
            thread.join()

        idle = wait_for(
            server,
            lambda m: (
                m.get("sglang:num_running_reqs", 1) == 0
                and m.get("sglang:num_queue_reqs", 1) == 0
                and pool_state(m)["held_by_requests"] == 0
            ),
            IDLE_TIMEOUT_S,
            "every slot free or cached when idle",
        )
        after = pool_state(idle)
        flushed = requests.post(f"{server.url}/flush_cache", timeout=60).status_code
        cleared = wait_for(
            server,
            lambda m: m["sglang:kv_available_tokens"] == m["sglang:max_total_num_tokens"],
            GAUGE_REFRESH_TIMEOUT_S,
            "every slot free after /flush_cache",
        )
        after_flush = pool_state(cleared)
        prober.probe("after")
        counters = {
            "retracted_requests": int(idle.get("sglang:num_retracted_requests_total", 0))
            - int(start_metrics.get("sglang:num_retracted_requests_total", 0)),
            "evicted_tokens": int(idle.get("sglang:evicted_tokens_total", 0))
            - int(start_metrics.get("sglang:evicted_tokens_total", 0)),
        }
    finally:
        alive = server.alive()
        server.stop()
    return report(args, load, prober, before, after, after_flush, flushed, peak, counters, scan_log(server.log), alive)


def report(args, load, prober, before, after, after_flush, flushed, peak, counters, log, alive) -> dict:
    rejections = prober.rejections
    intended = sum(1 for r in rejections if r["status"] == 400)
    requests_ = load["requests"]
    checks = {
        "no failed requests": requests_["failed"] == 0,
        "pool at pressure (requests retracted, or queued while the radix cache was evicted)": counters[
            "retracted_requests"
        ]
        > 0
        or (peak["queued"] > 0 and counters["evicted_tokens"] > 0),
        "every probe identical": len(prober.probes) >= 3 and all(p["identical"] for p in prober.probes),
        "every over-long prompt refused with 400": intended == len(rejections),
        "idle: every slot free or cached": after["held_by_requests"] == 0,
        "after /flush_cache: every slot free": flushed == 200 and after_flush["free"] == after_flush["capacity"],
        "no leak reported, server alive": log.get("leak_reports", 0) == 0 and alive,
    }
    return {
        "label": args.label,
        "settings": {
            "duration_s": args.duration,
            "pool_tokens": args.pool_tokens,
            "users": args.users,
            "output_tokens": args.output_tokens,
            "probe_interval_s": args.probe_interval,
            "new_token_ratio": args.new_token_ratio,
            "server_flags": args.server_flags,
            "host": args.host or "started by the soak",
        },
        "requests": {
            "sent": requests_["completed"] + requests_["failed"] + requests_["interrupted"],
            "completed": requests_["completed"],
            "failed": requests_["failed"],
            "interrupted_at_end": requests_["interrupted"],
            "failures_by_reason": load["failures"],
            "per_s": requests_["per_s"],
            "by_workload": {w: part["requests"]["completed"] for w, part in load["by_workload"].items()},
        },
        "intended_rejections": {
            "sent": len(rejections),
            "refused_with_400": intended,
            "messages": sorted({r["message"] for r in rejections}),
        },
        "latency_ms": {key: load[key] for key in ("ttft_ms", "itl_ms", "e2e_ms")},
        "cached_prompt_fraction": load["cached_prompt_fraction"],
        "pressure": counters | {f"peak_{key}": value for key, value in peak.items()} | log,
        "pool": {"before": before, "after_idle": after, "after_flush_cache": after_flush},
        "probes": {
            "sent": len(prober.probes),
            "identical": sum(p["identical"] for p in prober.probes),
            "reference": prober.reference,
            "differing_or_failed": [p for p in prober.probes if not p["identical"]],
            "slowest_s": max((p["seconds"] for p in prober.probes), default=None),
        },
        "checks": checks,
        "passed": all(checks.values()),
    }


def format_report(r: dict) -> str:
    s, q, pool, p = r["settings"], r["requests"], r["pool"], r["pressure"]
    lines = [
        f"{r['label']}: {s['duration_s']:.0f} s, {s['users']} users, pool {s['pool_tokens']} tokens, "
        f"{s['output_tokens']} output tokens per request",
        f"requests   {q['sent']} sent, {q['completed']} completed, {q['failed']} failed, "
        f"{q['interrupted_at_end']} cut by the end of the test; {q['per_s']:.2f} req/s; {q['by_workload']}",
        f"rejected   {r['intended_rejections']['refused_with_400']} of {r['intended_rejections']['sent']} over-long "
        f"prompts with 400: {r['intended_rejections']['messages'][:1]}",
        f"pressure   {p['retracted_requests']} requests retracted ({p.get('retraction_events', '?')} retraction "
        f"events in the log), {p['evicted_tokens']} radix-cache tokens evicted, peak {p['peak_held_by_requests']} "
        f"slots held by requests, peak queue {p['peak_queued']}",
        f"pool       before {pool['before']}",
        f"           idle   {pool['after_idle']}",
        f"           flush  {pool['after_flush_cache']}",
        f"probes     {r['probes']['identical']} of {r['probes']['sent']} identical (slowest "
        f"{r['probes']['slowest_s']} s)",
    ]
    if q["failures_by_reason"]:
        lines += [f"failure    {count:>5}  {reason}" for reason, count in q["failures_by_reason"].items()]
    lines += [f"check      {'ok  ' if ok else 'FAIL'} {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python loadtest/soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"), help="load time (10m)")
    parser.add_argument("--pool-tokens", type=int, default=2048, help="the server's --max-total-tokens (2048)")
    parser.add_argument("--users", type=int, default=16, help="concurrent streaming clients (16)")
    parser.add_argument("--output-tokens", type=int, default=96, help="tokens of every answer (96)")
    parser.add_argument("--probe-interval", type=float, default=30.0, help="seconds between probes (30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")
    parser.add_argument(
        "--new-token-ratio", type=float, default=0.1, help="SGLang's initial new-token ratio for admission (0.1)"
    )
    parser.add_argument("--host", default="", help="soak this running server (started with --enable-metrics)")
    parser.add_argument("--server-flags", nargs=argparse.REMAINDER, default=[], help="more python -m tq_serve flags")
    parser.add_argument("--out", type=Path, help="results dir (default: loadtest/results/<time>-soak)")
    parser.add_argument("--label", default="soak", help="name of the run in the summary")
    parser.add_argument("--sample", type=Path, help="also copy summary.json here (loadtest/samples/...)")
    args = parser.parse_args(argv)
    args.out = args.out or HERE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-soak"
    summary = soak(args)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_report(summary)
    (args.out / "summary.txt").write_text(text + "\n")
    if args.sample:
        shutil.copyfile(args.out / "summary.json", args.sample)
    print(text)
    print(f"results: {args.out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
