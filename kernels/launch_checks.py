"""Argument checks shared by every entry point that reads or writes a packed pool: the torch reference, the CPU path
and the Triton launchers. Plain torch (no Triton import), so the CPU path can use them.

A wrong slot index or a pool of the wrong layout would make a kernel read or corrupt memory outside the batch, so
these raise before anything runs, with the argument's name in the message.
"""

from __future__ import annotations

import torch

from .layout import VectorLayout
from .packed import PackedVectors

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_pool(name: str, pool: PackedVectors, layout: VectorLayout, num_kv_heads: int | None = None) -> None:
    """A pool is PackedVectors of `layout`, (slots, kv_heads, ...), each code row and norm row contiguous."""
    if not isinstance(pool, PackedVectors):
        raise TypeError(f"{name}: expected PackedVectors (codes, norms) of {layout}, got {type(pool).__name__}")
    pool.check(name, layout, dims=2)
    if pool.codes.stride(-1) != 1 or pool.norms.stride(-1) != 1:
        raise ValueError(f"{name}: code and norm rows must be contiguous, got strides {pool.codes.stride()}")
    if num_kv_heads is not None and pool.codes.shape[1] != num_kv_heads:
        raise ValueError(f"{name} has {pool.codes.shape[1]} KV heads, expected {num_kv_heads}")


def check_index_tensor(name: str, index: torch.Tensor) -> None:
    if index.dtype not in INDEX_DTYPES or index.dim() != 1 or (index.numel() > 1 and index.stride(0) != 1):
        raise ValueError(
            f"{name}: expected a contiguous 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}"
        )


def check_slots(name: str, slots: torch.Tensor, num_slots: int) -> None:
    """Every slot index must address the pool. Syncs the device."""
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= num_slots:
            raise IndexError(f"{name} holds slots in [{lo}, {hi}] but the pool has {num_slots} slots")


def check_kv_indptr(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_slots: int) -> None:
    """kv_indptr rises from >= 0, stays within kv_indices, and every slot it covers addresses the pool. Syncs."""
    if kv_indptr.numel() < 1:
        raise ValueError("kv_indptr must have batch + 1 entries, got an empty tensor")
    if bool((kv_indptr[1:] < kv_indptr[:-1]).any()) or int(kv_indptr[0]) < 0:
        raise ValueError(f"kv_indptr must be non-negative and non-decreasing, got {kv_indptr.tolist()}")
    end = int(kv_indptr[-1])
    if end > kv_indices.numel():
        raise ValueError(f"kv_indptr (ends at {end}) overruns kv_indices ({kv_indices.numel()})")
    check_slots("kv_indices", kv_indices[:end], num_slots)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return first


def check_kv_vectors(k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, head_dim: int, tokens: int) -> None:
    """New K and V to write: both (tokens, kv_heads, head_dim), float16, bfloat16 or float32."""
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 3 or tuple(x.shape) != (tokens, num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be (tokens, kv_heads, head_dim) = ({tokens}, {num_kv_heads}, {head_dim}) with tokens = "
                f"len(out_cache_loc), got {tuple(x.shape)}"
            )
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {x.dtype}")
