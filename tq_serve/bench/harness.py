"""What the serving benchmarks share: start `python -m tq_serve` as a user would, and record where a number came from.

Every benchmark compares TurboQuant against SGLang's bf16 KV cache (`--kv-cache bf16`) started the same way, in the
same run, and writes JSON stamped with the versions, the device and the git commit."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tq_serve.autotune.provenance import environment
from tq_serve.kernels.layout import parse_bits

START_TIMEOUT_S = 900


@dataclass(frozen=True, kw_only=True)
class KVSetting:
    """One KV-cache configuration to serve: plain SGLang's bf16 cache (bits 16), TurboQuant at `bits` with `variant`,
    or a per-layer bit schedule file (then `bits` is its average and the variant is the schedule's)."""

    bits: float
    variant: str = "mse"
    schedule: Path | None = None

    @property
    def name(self) -> str:
        if self.schedule is not None:
            return f"schedule:{self.schedule.stem}"
        return "bf16" if self.bits == 16 else f"tq{self.bits:g}-{self.variant}"

    def flags(self) -> list[str]:
        if self.schedule is not None:
            return ["--kv-schedule", str(self.schedule)]
        if self.bits == 16:
            return ["--kv-cache", "bf16"]
        return ["--kv-bits", f"{self.bits:g}", "--kv-variant", self.variant]


BF16 = KVSetting(bits=16)


def kv_settings(bits: list[str], variants: list[str]) -> list[KVSetting]:
    """bf16, then each bits value in each variant it exists in (prod: integer bits only)."""
    out = [BF16]
    for b in map(parse_bits, bits):
        out += [KVSetting(bits=b, variant=v) for v in variants if b != 16 and not (v == "prod" and b != int(b))]
    return out


def schedule_settings(names: Sequence[str]) -> list[KVSetting]:
    """A setting per schedule file or name in configs/schedules/ (loaded here, so a bad one fails before any server)."""
    from tq_serve.schedule import BitSchedule, resolve_schedule_path

    out = []
    for name in names:
        path = resolve_schedule_path(name)
        schedule = BitSchedule.load(path)
        out.append(KVSetting(bits=schedule.average_bits, variant=schedule.variant, schedule=path))
    return out


def model_flags(model: str, model_path: str | Path | None) -> list[str]:
    """The `python -m tq_serve` flags that select a benchmark's model."""
    return ["--model", model] + (["--model-path", str(model_path)] if model_path else [])


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerProcess:
    """A started `python -m tq_serve`: its base URL, its process and the file its output goes to."""

    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]


def healthy(url: str) -> bool:
    """Whether the server at url answers /health with 200."""
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def server_process(
    flags: Sequence[str],
    log: Path,
    *,
    ready: Callable[[str], bool] = healthy,
    start_timeout_s: float = START_TIMEOUT_S,
    stop_timeout_s: float = 60,
) -> Iterator[ServerProcess]:
    """`python -m tq_serve FLAGS --port P` in a subprocess, yielded once `ready(url)`; on exit SIGTERM, then SIGKILL
    after stop_timeout_s (a server that deploys on Ray needs SIGTERM to stop its private Ray)."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tq_serve", *flags, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    server = ServerProcess(url=f"http://127.0.0.1:{port}", proc=proc, log=log)
    # A benchmark stopped with SIGTERM (timeout, CI) must still stop its server: turn the signal into SystemExit.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {start_timeout_s} s"
                )
                raise RuntimeError(f"server {' '.join(flags)} {state}; its log ends:\n{server.log_tail()}")
            time.sleep(2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running_server(flags: Sequence[str], log: Path) -> Iterator[str]:
    """`python -m tq_serve FLAGS --port P` in a subprocess, until ready (/health); yields its base URL."""
    with server_process(flags, log) as server:
        yield server.url


def write_report(path: Path | None, benchmark: str, config: dict, rows: list[dict], **extra: object) -> dict:
    """Write {benchmark, environment, config, rows, **extra} as JSON to `path` (when given) and return it."""
    report = {"benchmark": benchmark, "environment": environment(), "config": config, "rows": rows, **extra}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def table(rows: list[dict], columns: dict[str, str]) -> str:
    """A fixed-width table of `rows`; `columns` maps a row key to its format spec (e.g. {'tokens': ',d'})."""
    cells = [[format(r[k], spec) if r.get(k) is not None else "-" for k, spec in columns.items()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
