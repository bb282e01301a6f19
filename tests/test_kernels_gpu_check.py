"""`make gpu-check ARGS=--dry-run`: every stage of the GPU check at tiny sizes on the CPU (Triton interpreter), in a
process that cannot import SGLang, pydantic or yaml, as on the bare GPU box the check is written for. A GPU run is
too scarce to lose to an import or argument error; this is what catches them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("sglang", "pydantic", "pydantic_settings", "yaml")

# Installed as sitecustomize.py ahead of site-packages: a meta-path finder that refuses the hidden packages.
BLOCKER = f"""
import sys

HIDDEN = {HIDDEN!r}


class HiddenPackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden: the GPU box has none)", name=name)
        return None


sys.meta_path.insert(0, HiddenPackages())
"""


def _run(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]), "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout
    )


@pytest.mark.parametrize("package", HIDDEN)
def test_the_blocker_hides_the_serving_packages(package: str, tmp_path: Path) -> None:
    proc = _run(["-c", f"import {package}"], tmp_path, timeout=60)
    assert proc.returncode != 0 and "hidden: the GPU box has none" in proc.stderr


def test_gpu_check_dry_run_runs_every_stage_without_serving_packages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(["-m", "tq_serve.bench", "gpu", "--dry-run", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["environment", "correctness", "decode", "extend", "write", "autotune", "step"]
    assert all(s["ok"] for s in stages.values()), [s.get("error") for s in stages.values()]
    assert report["dry_run"] is True and stages["environment"]["result"]["copy_GBps"] > 0
    assert all(c["passed"] for c in stages["correctness"]["result"]["cases"])
    decode = [r for r in stages["decode"]["result"]["rows"] if "bits" in r]
    assert {r["bits"] for r in decode} == {2, 3, 4} and all(r["tq_eager_ms"] > 0 for r in decode)
    assert all(r["tq_ms"].get("eager_ms") for r in stages["extend"]["result"]["rows"])
    assert all(r["GBps"] > 0 for r in stages["write"]["result"]["rows"])
    tuned = stages["autotune"]["result"]["keys"]
    assert tuned and all("path" in k for k in tuned), tuned
    for key in tuned:
        record = json.loads(Path(key["path"]).read_text())
        assert {"gpu", "triton", "torch", "commit"} <= set(record["stamp"]) and "dot_precision" in record["config"]
    step = stages["step"]["result"]["rows"]
    assert [r["bits"] for r in step] == [16, 4, 3, 2] and all(r["eager_ms"] > 0 for r in step)
    assert "DRY RUN" in proc.stdout
