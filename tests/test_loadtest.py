"""The load test against the real server: `python -m tq_serve` (TurboQuant KV cache, bundled model) on a free
loopback port, once for the module, then a short headless locust run of each workload through loadtest/run.py.

Sizes are small so that the four runs fit in a few minutes on a shared 2-core CPU; LOADTEST_DURATION sets each run's
length. The caller's TQ_* variables do not reach the server (tests/conftest.py). Locust runs as a subprocess only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_serve.bench.harness import running_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
API_KEY = "loadtest-secret"
DURATION = os.environ.get("LOADTEST_DURATION", "20s")
# Output and prompt sizes per run, in tokens; long-context fills the context (1024 for tq-tiny) minus a margin.
SIZES = ["--output-tokens", "8", "--prompt-tokens", "32", "--prefix-tokens", "256"]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(["--api-key", API_KEY], log) as url:
        yield url


@pytest.mark.parametrize("workload", ["chat", "shared-prefix", "long-context", "mixed"])
def test_workload_runs_without_failures(server_url, workload, tmp_path):
    out = tmp_path / workload
    command = [sys.executable, str(LOADTEST / "run.py"), "--host", server_url, "--workload", workload]
    command += ["--users", "2", "--spawn-rate", "2", "--duration", DURATION, "--out", str(out), "--label", workload]
    command += ["--api-key", API_KEY, "--stop-timeout", "120s", *SIZES]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"]["completed"] > 0, output
    assert summary["requests"]["failed"] == 0 and summary["failures"] == {}, output
    assert summary["ttft_ms"]["n"] == summary["requests"]["completed"]
    assert summary["itl_ms"]["n"] > 0 and summary["itl_ms"]["p50"] > 0
    assert summary["output_tokens"]["per_s"] > 0
    expected = {"chat", "shared-prefix", "long-context"} if workload == "mixed" else {workload}
    assert set(summary["by_workload"]) <= expected
    names = {entry["name"] for entry in json.loads((out / "locust_stats.json").read_text())}
    ran = set(summary["by_workload"])
    assert {f"{metric} {w}" for metric in ("TTFT", "ITL", "E2E") for w in ran} <= names
    if workload == "shared-prefix":
        # The locustfile primes the cache with the system prompt, so every request reuses it (256 of ~350 tokens).
        assert summary["cached_prompt_fraction"] > 0.5, "the shared system prompt should come from the radix cache"
    if workload == "long-context":
        context = summary["run"]["server"]["context_length"]
        assert summary["prompt_tokens_mean"] > 0.75 * context, "long-context prompts should be near the context"
