"""The plug-in's side of the configuration hand-off: what it registers as, and what it reads.

SGLang starts its scheduler in subprocesses and calls the plug-in's `register()` in each of them, with no way to pass
arguments. So the launcher (python -m tq_serve) resolves one frozen TurboQuantConfig at the edge
(tq_serve/kv_config.py) and writes it, serialised, into ONE environment variable before SGLang starts:

    TQ_SGLANG_CONFIG='{"kv_bits": null, "schedule": {"name": "tq-tiny-3.0", ..., "layer_bits": [[4, 4], ...]},
                       "variant": "mse", "rotation": "hadamard", "norm_correction": true, "norm_dtype": "float16",
                       "seed": 0, "batch_invariant_cpu": false, "use_triton_interpreter": false}'

Every process inherits it and `TurboQuantConfig.from_env()` deserialises it; nothing is resolved again here (no flag,
preset or schedule file is read). A missing variable means the defaults: uniform 4-bit mse.
"""

from __future__ import annotations

from tq_serve.kv_config import ENV_VAR, TurboQuantConfig

BACKEND_NAME = "turboquant"  # the --attention-backend choice the plug-in registers

__all__ = ["BACKEND_NAME", "ENV_VAR", "TurboQuantConfig"]
