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


def _padded(head_dim: int) -> int:
    return 1 << (head_dim - 1).bit_length()


def keep(kernel: str, config: dict, head_dim: int) -> bool:
    """False for configs that cannot fit: blocks wider than the head, tiles beyond registers or shared memory."""
    d = _padded(head_dim)
    threads = 32 * config["num_warps"]
    if kernel == "write":
        if config["block_k"] > d:
            return False
        tile = config["block_m"] * d  # the rotated rows live in registers while codes are packed
        return tile / threads <= MAX_TILE_ELEMENTS_PER_THREAD
    if kernel == "decode":
        tile = config["block_n"] * d  # unpacked centroid values of one K or V block
        staged = config["num_stages"] * config["block_n"] * d  # packed bytes of K and V, <= 1 byte per coordinate
        return tile / threads <= MAX_TILE_ELEMENTS_PER_THREAD and staged <= SHARED_MEMORY_BYTES
    if kernel == "extend":
        tile = max(config["block_m"], config["block_n"]) * d
        staged = config["num_stages"] * (config["block_m"] * d * 4 + config["block_n"] * d)
        return tile / threads <= MAX_TILE_ELEMENTS_PER_THREAD and staged <= SHARED_MEMORY_BYTES
    raise ValueError(f"unknown kernel {kernel!r}: known kernels are {', '.join(KERNEL_PARAMS)}")


def candidates(kernel: str, head_dim: int, space: dict | None = None) -> list[dict]:
    """All configs of `space` (default: SPACES[kernel]) that `keep` admits, in a stable order."""
    space = SPACES[kernel] if space is None else space
    names = list(space)
    configs = [dict(zip(names, values, strict=True)) for values in itertools.product(*(space[n] for n in names))]
    return [c for c in configs if keep(kernel, c, head_dim)]


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
