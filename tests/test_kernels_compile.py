"""The Triton kernels pass the real compiler for a Hopper GPU (sm_90a), on any machine, and decode fits its budget.

The interpreter accepts programs the compiler rejects (shapes that are not constexpr, layouts the backend cannot
lower, shared memory beyond the GPU's), so this compiles each kernel to a cubin with Triton's bundled ptxas through
`python -m tq_serve.bench kernels --static` (a subprocess without TRITON_INTERPRET; the launchers build the arguments
as for a real launch and only the launch is replaced). It holds decode at 4 bits, d=128, GQA 4 (Llama-3.1-8B) to
twice the instructions per token-head that streaming its bytes at the copy rate leaves, with no spills. With or
without a GPU: compiling for sm_90a needs none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MEMORY_BYTES = 227 * 1024  # per block on H100/H200


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="this Triton build has no NVIDIA backend to compile with")


def _static(cases: list[str], tmp_path: Path) -> list[dict]:
    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-m", "tq_serve.bench", "kernels", "--static", "--cases", *cases, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "per tok-head" in proc.stdout
    return json.loads(out.read_text())["rows"]


def test_decode_at_4_bits_fits_twice_its_bandwidth_budget(tmp_path: Path) -> None:
    (row,) = _static(["decode-d128-b4-mse-g4"], tmp_path)
    assert row["kernel"] == "_decode_split_kernel"
    assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0 and row["stack_bytes"] == 0
    assert 0 < row["registers"] <= 255 and row["shared_bytes"] <= SHARED_MEMORY_BYTES
    budget = row["per_token_head"]
    assert 25 < budget["budget"] < 40  # 132 B + the index, at an H200's issue and copy rates
    assert 0 < budget["warp_instructions"] <= 2 * budget["budget"], budget
    assert row["loop_sass"]["by_kind"].get("tensor_core", 0) > 0  # the dots run on tensor cores
    assert not any(op.startswith("LDG.E.U8") for op in row["loop_sass"]["loads"])  # no single-byte code loads


@pytest.mark.slow
def test_every_kernel_compiles_for_odd_layouts(tmp_path: Path) -> None:
    """A padded head_dim, two segments (3-bit and 2-bit planes), QJL signs, GQA 8, and each kernel."""
    cases = ["decode-d80-b2.5-mse-g8", "decode-d96-b3-prod-g4", "extend-d80-b3.5-mse-g4", "write-d96-b3-prod-g1"]
    rows = _static(cases, tmp_path)
    assert [r["case"] for r in rows] == cases
    for row in rows:
        assert row["shared_bytes"] <= SHARED_MEMORY_BYTES, f"{row['case']} needs {row['shared_bytes']} B of shared"
        assert row["kernel_sass"]["instructions"] > 0
