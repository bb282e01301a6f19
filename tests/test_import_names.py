"""kernels/ and autotune/ must never shadow installed packages: sglang depends on Hugging Face's `kernels`."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, json
import kernels
import tq_serve.kernels.layout as layout, tq_serve.autotune
print(json.dumps({"kernels": kernels.__file__, "layout": layout.__file__,
                  "autotune": list(tq_serve.autotune.__path__), "has_get_kernel": hasattr(kernels, "get_kernel")}))
"""


def test_bare_kernels_is_hugging_face_even_from_the_repo_root():
    # `python -c` from the repo root puts the checkout first on sys.path, as `python -m tq_serve` does.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True)
    import json

    found = json.loads(out.stdout)
    assert "site-packages" in found["kernels"] and found["has_get_kernel"]
    assert Path(found["layout"]) == REPO / "kernels" / "layout.py"
    assert [Path(p) for p in found["autotune"]] == [REPO / "autotune"]


def test_kernels_and_autotune_folders_carry_no_init():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "autotune" / "__init__.py").exists()
