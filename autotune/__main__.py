"""`python -m tq_serve.autotune`: tune the Triton kernels' launch configs for this GPU and write configs/kernels/.

Runs with torch, Triton and numpy alone (PYTHONPATH=. on a bare GPU box works). Without a GPU, `--tiny` tunes a tiny
space at tiny shapes under the Triton interpreter: that checks the machinery, and the timings mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import triton

from ..kernels.layout import SUPPORTED_HEAD_DIMS, parse_bits
from .spaces import KERNEL_PARAMS, TINY_SPACES
from .store import CONFIG_DIR, TuningKey
from .tuner import device_name, tune_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.autotune", description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=list(KERNEL_PARAMS), choices=list(KERNEL_PARAMS))
    # The default is what serving Llama-3.1-8B-like models needs (9 keys, ~10 candidates each); other keys fall back to
    # the nearest tuned one, so widen the lists only for the models you serve.
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128], help=f"of {SUPPORTED_HEAD_DIMS}")
    parser.add_argument("--bits", nargs="+", default=["2", "3", "4"], help="K and V bits (tuned as equal pairs)")
    parser.add_argument("--groups", nargs="+", type=int, default=[4], help="GQA group sizes (q heads per kv)")
    parser.add_argument("--variants", nargs="+", default=["mse"], choices=["mse", "prod"])
    parser.add_argument("--out", type=Path, default=CONFIG_DIR, help="config directory (default: configs/kernels)")
    parser.add_argument("--tiny", action="store_true", help="tiny space and shapes (CPU interpreter, for tests)")
    args = parser.parse_args(argv)
    try:
        bits = [parse_bits(b) for b in args.bits]
        bad = [d for d in args.head_dims if d not in SUPPORTED_HEAD_DIMS]
        if bad:
            raise ValueError(f"unsupported head_dim {bad[0]}: supported values are {SUPPORTED_HEAD_DIMS}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu, version = device_name(), triton.__version__
    keys = []
    for kernel, d, b, group, variant in itertools.product(
        args.kernels, args.head_dims, bits, args.groups, args.variants
    ):
        # The write kernel has no queries: its best config cannot depend on the GQA group.
        key = TuningKey(
            kernel=kernel,
            gpu=gpu,
            triton=version,
            head_dim=d,
            k_bits=b,
            v_bits=b,
            group=1 if kernel == "write" else group,
            variant=variant,
        )
        if key not in keys:
            keys.append(key)
    print(f"tuning {len(keys)} keys on {gpu} (Triton {version}) into {args.out}")
    results = tune_keys(
        keys, spaces=TINY_SPACES if args.tiny else None, size="tiny" if args.tiny else "gpu", config_dir=args.out
    )
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['key']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
