"""Running SGLang without a GPU, for the server and every process it spawns.

SGLang's CPU engine needs SGLANG_USE_CPU_ENGINE=1 before sglang is first imported, and an importable `sgl_kernel`
(the installed wheel dies on a missing libcuda). `apply_cpu_support` sets both through the environment and sys.path:
children started with multiprocessing's spawn (SGLang's scheduler and detokenizer) inherit os.environ and receive
the parent's sys.path, and any other subprocess picks the shim up from PYTHONPATH. No sitecustomize, no import hooks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"


def detect_device() -> Literal["cuda", "cpu"]:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The variables to add to `environ` so that SGLang (and its children) run on a CPU."""
    path = [str(SHIM_DIR), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}


def apply_cpu_support() -> None:
    """Set up this process and its future children for SGLang's CPU engine. Call before importing sglang."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" and str(SHIM_DIR) in sys.path:
        return
    if "sglang" in sys.modules:
        raise RuntimeError("apply_cpu_support() must run before sglang or sgl_kernel is imported")
    os.environ.update(cpu_environment(os.environ))
    if str(SHIM_DIR) not in sys.path:
        sys.path.insert(0, str(SHIM_DIR))
