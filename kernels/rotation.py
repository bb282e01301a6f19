"""Seeded orthogonal rotations R (d, d): y = R x for a column vector, `x @ R.T` for rows.

- "qr": Haar-random orthogonal matrix, the Q of a QR decomposition of a Gaussian matrix with the signs of R's
  diagonal folded in (without that fold Q is not uniformly distributed).
- "hadamard": randomized Walsh-Hadamard, R = H D / sqrt(d) with D random +-1 signs. Exactly orthogonal and cheap to
  apply, but only defined here for power-of-two d. For other head_dims (80, 96) a Hadamard of that order would need a
  non-Sylvester construction and a block-diagonal one mixes coordinates only within blocks (so coordinates would not
  follow the sphere law the codebooks assume); those head_dims therefore use the "qr" rotation, with one log line.

Kernels never see the kind: they take R as a dense matrix, rotate the query once per step and the output back once.
The QJL projection S of the prod variant is a seeded i.i.d. N(0, 1) matrix from its own stream.
"""

from __future__ import annotations

import logging
from functools import cache

import torch

logger = logging.getLogger(__name__)

ROTATIONS = ("qr", "hadamard")


def _generator(seed: int, stream: int) -> torch.Generator:
    # Distinct streams keep R and S independent for the same user seed.
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + stream)


def _haar(d: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@cache
def rotation_matrix(head_dim: int, seed: int = 0, kind: str = "qr") -> torch.Tensor:
    """Orthogonal (head_dim, head_dim) float32 on CPU; callers move it to their device once."""
    if kind not in ROTATIONS:
        raise ValueError(f"unsupported rotation {kind!r}: supported values are {', '.join(ROTATIONS)}")
    gen = _generator(seed, 0)
    if kind == "hadamard" and head_dim & (head_dim - 1) == 0:
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.float64) * 2 - 1
        rot = _sylvester(head_dim) * signs.unsqueeze(0) / head_dim**0.5
    else:
        if kind == "hadamard":
            logger.info(
                "head_dim %d is not a power of two: using the dense 'qr' rotation instead of 'hadamard'", head_dim
            )
        rot = _haar(head_dim, gen)
    return rot.to(torch.float32)


@cache
def qjl_matrix(head_dim: int, seed: int = 0) -> torch.Tensor:
    """The QJL projection S (head_dim, head_dim), i.i.d. N(0, 1), float32 on CPU."""
    return torch.randn(head_dim, head_dim, generator=_generator(seed, 1), dtype=torch.float64).to(torch.float32)
