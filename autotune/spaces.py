"""Search spaces of the Triton kernels' launch parameters, pruned by what a GPU can hold.

A config is a dict of the launcher's keyword arguments (kernels/triton_*.py; blocks are powers of two >= 16, the
smallest tl.dot tile). Spaces are generated as a product and filtered by `keep`, which drops configs that would
exceed shared memory or registers, or whose blocks do not fit the head_dim; the tuner then skips whatever still fails
to compile or run.
"""

from __future__ import annotations

import itertools

# Launcher keyword arguments that a tuned config may set, per kernel. The decode's num_kv_splits is not tuned: the
# launcher derives it from the batch (enough programs to fill the SMs), which a config tuned at one batch cannot know;
# an explicit value is still accepted.
KERNEL_PARAMS = {
    "write": ("block_m", "block_k", "num_warps", "num_stages", "dot_precision"),
    "decode": ("block_n", "num_warps", "num_stages", "num_kv_splits", "dot_precision"),
    "extend": ("block_m", "block_n", "num_warps", "num_stages", "dot_precision"),
}

# The write's rotation must stay a float32-accurate sum: "ieee" (FMA) or "tf32x3" (three tensor-core passes), which
# the flip budget decides between; plain tf32 moves too many codes. Attention takes bf16 operands (their rounding is
# far below the 2-4 bit quantization error).
SPACES = {
    "write": {
        "block_m": [16, 32, 64],
        "block_k": [16, 32],
        "num_warps": [4, 8],
        "num_stages": [1],
        "dot_precision": ["ieee", "tf32x3"],
    },
    "decode": {"block_n": [32, 64, 128], "num_warps": [4, 8], "num_stages": [1, 2, 3], "dot_precision": ["bf16"]},
    "extend": {
        "block_m": [16, 32, 64],
        "block_n": [32, 64],
        "num_warps": [4, 8],
        "num_stages": [1, 2],
        "dot_precision": ["bf16"],
    },
}

# The GPU check's autotune stage: a few candidates per key, so that decode and write at three bit widths tune in
# about a minute and a half of compiles.
GPU_CHECK_SPACES = {
    "write": {
        "block_m": [16, 32],
        "block_k": [16],
        "num_warps": [4],
        "num_stages": [1],
        "dot_precision": ["ieee", "tf32x3"],
    },
    "decode": {"block_n": [64, 128], "num_warps": [4], "num_stages": [1, 2], "dot_precision": ["bf16"]},
    "extend": {"block_m": [32], "block_n": [32, 64], "num_warps": [4], "num_stages": [1], "dot_precision": ["bf16"]},
}

# For tests under the Triton interpreter: a handful of candidates, each cheap to run.
TINY_SPACES = {
    "write": {"block_m": [16, 32], "block_k": [32], "num_warps": [4], "num_stages": [1], "dot_precision": ["ieee"]},
    "decode": {"block_n": [16, 32], "num_warps": [4], "num_stages": [1], "dot_precision": ["bf16"]},
    "extend": {"block_m": [16], "block_n": [16, 32], "num_warps": [4], "num_stages": [1], "dot_precision": ["bf16"]},
}

SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper (H100/H200); smaller GPUs fail at compile and are skipped
MAX_TILE_ELEMENTS_PER_THREAD = 128  # beyond this an fp32 tile spills registers
# Decode and extend convert bf16 K/V tiles to dot operands through shared memory and stage code rows there when
# pipelined. Measured on sm_90a with Triton 3.8 (bench kernels --static --config block_n=64 num_stages=2): decode
# 13 KiB at d=128 (18 KiB prod), 22 KiB at d=256; extend 64 x 64, 2 stages: 40 KiB. The estimates below stay at or
# above those, within 1.5x.
PROD_SHARED_FACTOR = 1.5  # the QJL sign tiles of K and V


def _padded(head_dim: int) -> int:
    return 1 << (head_dim - 1).bit_length()


def shared_memory_estimate(kernel: str, config: dict, head_dim: int, variant: str = "mse") -> float:
    """Bytes of shared memory a config needs, from the tiles it converts and stages (see the measurements above)."""
    d, stages = _padded(head_dim), max(1, config["num_stages"])
    factor = PROD_SHARED_FACTOR if variant == "prod" else 1.0
    if kernel == "write":
        return config["block_m"] * config["block_k"] * 4 + config["block_k"] * d * 4  # rows and a slice of R
    if kernel == "decode":
        return factor * config["block_n"] * d * (1 + stages / 2)
    if kernel == "extend":
        return factor * 1.3 * (config["block_m"] * d * 2 + config["block_n"] * d * (1 + stages / 2))
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
    """The launchers' own defaults (used when nothing was tuned): the decode's split count is left to its rule."""
    wide = _padded(head_dim) > 128
    if kernel == "write":
        return {"block_m": 16, "block_k": 16, "num_warps": 4, "num_stages": 1, "dot_precision": "ieee"}
    if kernel == "decode":
        return {"block_n": 64 if wide else 128, "num_warps": 4, "num_stages": 1, "dot_precision": "bf16"}
    if kernel == "extend":
        return {"block_m": 16 if wide else 32, "block_n": 64, "num_warps": 4, "num_stages": 1, "dot_precision": "bf16"}
    raise ValueError(f"unknown kernel {kernel!r}: known kernels are {', '.join(KERNEL_PARAMS)}")
