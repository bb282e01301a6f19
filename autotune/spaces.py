"""Search spaces of the Triton kernels' launch parameters, pruned by what a GPU can hold.

A config is a dict of the launcher's keyword arguments (kernels/triton_*.py; blocks are powers of two >= 16, the
smallest tl.dot tile). Spaces are generated as a product and filtered by `keep`, which drops configs that would
exceed shared memory or registers, or whose blocks do not fit the head_dim; the tuner then skips whatever still fails
to compile or run.
"""

from __future__ import annotations

import itertools

# Launcher keyword arguments that a tuned config may set, per kernel.
KERNEL_PARAMS = {
    "write": ("block_m", "block_k", "num_warps", "num_stages"),
    "decode": ("block_n", "num_warps", "num_stages", "num_kv_splits"),
    "extend": ("block_m", "block_n", "num_warps", "num_stages"),
}

SPACES = {
    "write": {"block_m": [16, 32, 64], "block_k": [32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2]},
    "decode": {
        "block_n": [16, 32, 64, 128],
        "num_warps": [2, 4, 8],
        "num_stages": [1, 2, 3],
        "num_kv_splits": [4, 8, 16, 32],
    },
    "extend": {"block_m": [16, 32, 64], "block_n": [16, 32, 64], "num_warps": [4, 8], "num_stages": [1, 2]},
}

# For tests under the Triton interpreter: a handful of candidates, each cheap to run.
TINY_SPACES = {
    "write": {"block_m": [16, 32], "block_k": [32], "num_warps": [4], "num_stages": [1]},
    "decode": {"block_n": [16, 32], "num_warps": [4], "num_stages": [1], "num_kv_splits": [2]},
    "extend": {"block_m": [16], "block_n": [16, 32], "num_warps": [4], "num_stages": [1]},
}

SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper (H100/H200); smaller GPUs fail at compile and are skipped
MAX_TILE_ELEMENTS_PER_THREAD = 128  # beyond this an fp32 tile spills registers
# Unpacked K/V tiles feed tl.dot as fp32 (4 bytes per coordinate, K and V), and each pipeline stage holds its own.
# Measured on sm_90 with Triton 3.8 at d=128, 2 stages: decode block_n 64 takes 120 KiB (mse) and 168 KiB (prod),
# extend 64x64 takes 192 KiB; the estimates below stay within ~10% of those, on the high side.
PROD_SHARED_FACTOR = 1.4  # QJL sign tiles of K and V


def _padded(head_dim: int) -> int:
    return 1 << (head_dim - 1).bit_length()


def shared_memory_estimate(kernel: str, config: dict, head_dim: int, variant: str = "mse") -> float:
    """Bytes of shared memory a config needs, from the fp32 operand tiles it stages."""
    d, stages = _padded(head_dim), max(1, config["num_stages"])
    factor = PROD_SHARED_FACTOR if variant == "prod" else 1.0
    if kernel == "write":
        return config["block_m"] * config["block_k"] * 4 + config["block_k"] * d * 4  # rows and a slice of R
    if kernel == "decode":
        return factor * stages * config["block_n"] * d * 8
    if kernel == "extend":
        return factor * 1.2 * (config["block_m"] * d * 4 + stages * config["block_n"] * d * 8)
    raise ValueError(f"unknown kernel {kernel!r}: known kernels are {', '.join(KERNEL_PARAMS)}")


def keep(kernel: str, config: dict, head_dim: int, variant: str = "mse") -> bool:
    """False for configs that cannot fit: blocks wider than the head, tiles beyond registers or shared memory."""
    if shared_memory_estimate(kernel, config, head_dim, variant) > SHARED_MEMORY_BYTES:
        return False
    d, threads = _padded(head_dim), 32 * config["num_warps"]
    if kernel == "write":
        # The rotated rows live in registers while their codes are packed.
        return config["block_k"] <= d and config["block_m"] * d / threads <= MAX_TILE_ELEMENTS_PER_THREAD
    rows = config["block_n"] if kernel == "decode" else max(config["block_m"], config["block_n"])
    return rows * d / threads <= MAX_TILE_ELEMENTS_PER_THREAD


def candidates(kernel: str, head_dim: int, space: dict | None = None, variant: str = "mse") -> list[dict]:
    """All configs of `space` (default: SPACES[kernel]) that `keep` admits, in a stable order."""
    space = SPACES[kernel] if space is None else space
    names = list(space)
    configs = [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n] for n in names))]
    return [c for c in configs if keep(kernel, c, head_dim, variant)]


def default_config(kernel: str, head_dim: int) -> dict:
    """The rule of thumb used when nothing was tuned: moderate blocks, 4 warps, splits for long contexts."""
    wide = _padded(head_dim) > 128
    if kernel == "write":
        return {"block_m": 16, "block_k": 64 if head_dim >= 64 else 32, "num_warps": 4, "num_stages": 1}
    if kernel == "decode":
        return {"block_n": 32 if wide else 64, "num_warps": 4, "num_stages": 2, "num_kv_splits": 8}
    if kernel == "extend":
        return {"block_m": 32, "block_n": 32 if wide else 64, "num_warps": 4, "num_stages": 1}
    raise ValueError(f"unknown kernel {kernel!r}: known kernels are {', '.join(KERNEL_PARAMS)}")
