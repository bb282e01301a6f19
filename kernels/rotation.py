"""Seeded orthogonal rotations R (d, d): y = R x for a column vector, `x @ R.T` for rows.

- "qr": Haar-random orthogonal matrix, the Q of a QR decomposition of a Gaussian matrix with the signs of R's
  diagonal folded in (without that fold Q is not uniformly distributed).
- "hadamard": randomized Walsh-Hadamard, R = H D / sqrt(d) with D random +-1 signs. Exactly orthogonal and cheap to
  apply, but only defined here for power-of-two d. For other head_dims (80, 96) a Hadamard of that order would need a
  non-Sylvester construction and a block-diagonal one mixes coordinates only within blocks (so coordinates would not
  follow the sphere law the codebooks assume); those head_dims therefore use the "qr" rotation, with one log line.

Kernels never see the kind: they take R as a dense matrix, rotate the query once per step and the output back once.
The QJL projection S of the prod variant is seeded from its own stream (see qjl_matrix).
"""

from __future__ import annotations

import logging
import math
from functools import cache

import torch

logger = logging.getLogger(__name__)

ROTATIONS = ("qr", "hadamard")


_STREAM_BASE = 0x7A5E_1D00  # keeps R and S off the small seeds that data generators use (0, 1, ...)


def _generator(seed: int, stream: int) -> torch.Generator:
    # Distinct streams keep R and S independent of each other and of any test data drawn with manual_seed(seed):
    # data correlated with the Gaussian matrix behind R is not uniformly rotated.
    # torch's CPU generator keeps only the low 32 bits of a seed, so the stream seed is reduced explicitly.
    return torch.Generator(device="cpu").manual_seed((_STREAM_BASE + seed * 1_000_003 + stream) % 2**32)


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
    """The QJL projection S (head_dim, head_dim), float32 on CPU: i.i.d. Gaussian rows scaled to norm sqrt(d).

    Row directions stay uniform and independent, so E[sign(s.r) s] = sqrt(d) E|u_1| r/|r| still holds (see
    `qjl_scale`), but the chi-square spread of Gaussian row norms no longer adds variance: at d=128 this lowers
    d_prod by 1-3% against plain N(0, 1) rows for every seed tried.
    """
    s = torch.randn(head_dim, head_dim, generator=_generator(seed, 1), dtype=torch.float64)
    return (s * (head_dim**0.5 / s.norm(dim=1, keepdim=True))).to(torch.float32)


def qjl_scale(head_dim: int) -> float:
    """c in r~ = c * gamma * S^T sign(S r), making E[r~] = r for rows of norm sqrt(d) with uniform directions.

    E|u_1| for u uniform on S^{d-1} is Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)), so c = 1 / (d sqrt(d) E|u_1|);
    it tends to sqrt(pi/2) / d, the constant of Gaussian QJL (TurboQuant Definition 1).
    """
    mean_abs = math.exp(math.lgamma(head_dim / 2) - math.lgamma((head_dim + 1) / 2)) / math.sqrt(math.pi)
    return 1.0 / (head_dim * math.sqrt(head_dim) * mean_abs)
