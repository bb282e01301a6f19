"""tq_serve: TurboQuant KV-cache compression for LLM serving on SGLang."""

from pathlib import Path

__version__ = "0.1.0"

# kernels/ and autotune/ live at the repo root without an __init__.py: the bare name `kernels` belongs to Hugging
# Face's package (an sglang dependency), and a directory without __init__.py never shadows a regular package, even
# when the repo root is sys.path[0] (`python -m` from the checkout). In a source checkout (editable install or
# PYTHONPATH on a bare GPU box) they become tq_serve.kernels / tq_serve.autotune through this path entry; a wheel
# gets them through package-dir in pyproject.toml.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "kernels").is_dir() and not (Path(__file__).parent / "kernels").is_dir():
    __path__.append(str(_checkout))
