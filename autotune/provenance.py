"""Where a measured number came from: versions, device and commit. One stamp for tuned kernel configs (autotune),
benchmark reports (tq_serve.bench) and load-test summaries (loadtest/).

Lives in autotune/ because the tuner is its lowest user: autotune may import only torch, triton, numpy and the
standard library. The load test imports it too, in locust's own process, so the module itself imports nothing but
the standard library: versions come from package metadata, and torch is imported only when the device is asked for.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
PACKAGES = ("tq_serve", "sglang", "torch", "triton", "transformers")


def git_commit(checkout: Path = CHECKOUT) -> str | None:
    """HEAD of the checkout, with '-dirty' when tracked files differ from it; None outside a git checkout (a wheel)."""
    try:
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:  # no git
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None: not installed), read from metadata without importing it."""

    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: one(name) for name in names}


def device_name() -> str:
    """The CUDA device torch sees, else 'cpu (<processor>)'. Imports torch."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def cpu_model() -> str:
    """The CPU's model name and its widest vector extensions (CPU speed ratios differ by both: torch's bf16 SDPA runs
    6.6x faster on a Xeon with AVX512-BF16 than on an EPYC without), e.g. 'Intel(R) Xeon(R) Processor [avx512f
    avx512_bf16]'."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    wide = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} [{' '.join(wide)}]"


def environment(packages: Iterable[str] = PACKAGES, *, device: bool = True) -> dict:
    """The stamp: device (unless device=False: no torch import), CPU model and count, Python, package versions, git
    commit."""
    return (
        ({"device": device_name()} if device else {})
        | {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
        | package_versions(packages)
        | {"git_commit": git_commit()}
    )
