"""The kernel benchmark's code runs end to end (--smoke: tiny shapes, on CPU under the Triton interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

from tq_serve.bench import kernels


def test_kernel_benchmark_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kernels.json"
    assert kernels.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["timings_meaningful"] is False
    assert {"device", "torch", "triton", "git_commit"} <= set(report["environment"])
    kinds = {row["kernel"] for row in report["rows"] if "skipped" not in row}
    assert kinds == {"decode", "write", "step"}
    for row in report["rows"]:
        assert row["tq_us"] > 0 and row["peer_us"] > 0
    assert "meaningless" in capsys.readouterr().out
