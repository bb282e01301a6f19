"""The pool-pressure soak (loadtest/soak.py, `make soak`) in short: one minute of load on a 2048-token pool.

The soak starts its own server and checks itself (no failed request, retractions or evictions seen, identical probe
outputs, over-long prompts refused with 400, every slot back when idle and after /flush_cache); this test runs it as
a user does and holds it to its verdict and to the figures it reports. The committed 10-minute sample is in
loadtest/samples/.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

SOAK = Path(__file__).resolve().parents[1] / "loadtest" / "soak.py"


def test_a_short_soak_at_pool_pressure_loses_nothing(tmp_path):
    out = tmp_path / "soak"
    command = [sys.executable, str(SOAK), "--duration", "60s", "--users", "8", "--output-tokens", "64"]
    command += ["--probe-interval", "15", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    report = out / "summary.json"
    assert report.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert done.returncode == 0 and summary["passed"], done.stdout[-3000:]
    assert all(summary["checks"].values())
    requests = summary["requests"]
    assert requests["completed"] > 0 and requests["failed"] == 0 and requests["failures_by_reason"] == {}
    pressure = summary["pressure"]
    assert pressure["retracted_requests"] > 0 or pressure["evicted_tokens"] > 0
    pool = summary["pool"]
    assert pool["after_flush_cache"]["free"] == pool["after_flush_cache"]["capacity"] == 2048
    assert pool["after_idle"]["held_by_requests"] == 0
    assert summary["probes"]["sent"] >= 3 and summary["probes"]["identical"] == summary["probes"]["sent"]
    assert summary["intended_rejections"]["refused_with_400"] == summary["intended_rejections"]["sent"] > 0
