"""What the serving benchmarks share: start `python -m tq_serve` as a user would, and record where a number came from.

Every benchmark compares TurboQuant against SGLang's bf16 KV cache (`--kv-cache bf16`) started the same way, in the
same run, and writes JSON stamped with the versions, the device and the git commit."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import httpx

from tq_serve.kernels.layout import parse_bits
from tq_serve.registry import REPO_ROOT

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


@contextlib.contextmanager
def running_server(flags: Sequence[str], log: Path) -> Iterator[str]:
    """`python -m tq_serve FLAGS --port P` in a subprocess, until ready (/health); yields its base URL."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tq_serve", *flags, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    # A benchmark stopped with SIGTERM (timeout, CI) must still stop its server: turn the signal into SystemExit.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {' '.join(flags)} did not start; its log ends:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        signal.signal(signal.SIGTERM, previous)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment() -> dict:
    """Versions, device and commit: what a reader needs to compare two JSON files."""
    import torch

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    return {
        "device": device,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **{name: pkg(name) for name in ("tq_serve", "sglang", "torch", "triton", "transformers")},
        "git_commit": git_commit(),
    }


def write_report(path: Path | None, benchmark: str, config: dict, rows: list[dict]) -> dict:
    """Write {benchmark, environment, config, rows} as JSON to `path` (when given) and return it."""
    report = {"benchmark": benchmark, "environment": environment(), "config": config, "rows": rows}
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
