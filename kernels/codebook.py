"""Lloyd-Max codebooks for one coordinate of a uniformly random unit vector in R^d.

A coordinate x of a random point on the sphere S^{d-1} has density (TurboQuant, Lemma 1)

    f_d(x) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * (1 - x^2)^((d-3)/2),   x in [-1, 1],

i.e. (x + 1) / 2 ~ Beta(a, a) with a = (d-1)/2; variance 1/d. After a random rotation every coordinate of a unit
vector has this law, so one scalar codebook per (d, bits) is optimal for all of them. Lloyd-Max alternates
"boundaries = midpoints of centroids" and "centroid = conditional mean of its cell"; both steps are exact here because
the Beta law gives the cell mass and first moment in closed form:

    P(t in [t0, t1])      = I(t1; a, a)     - I(t0; a, a)
    E[t; t in [t0, t1]]   = 1/2 * (I(t1; a+1, a) - I(t0; a+1, a))         (I = regularized incomplete beta)

Solving takes scipy and a fraction of a second, but start-up should not solve integrals: the codebooks of the
supported head_dims ship as data (data/codebooks.json, written by `python -m tq_serve.kernels.codebook --write`).
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .layout import SUPPORTED_HEAD_DIMS

logger = logging.getLogger(__name__)

DATA_FILE = Path(__file__).parent / "data" / "codebooks.json"
CODEBOOK_BITS = (1, 2, 3, 4)
_FORMAT = 1


def solve_lloyd_max(head_dim: int, bits: int, *, tol: float = 1e-13, max_iter: int = 10_000) -> np.ndarray:
    """Centroids (2**bits,) float64, sorted, of the Lloyd-Max quantizer for f_d. Needs scipy."""
    from scipy.special import betainc, betaincinv

    a = (head_dim - 1) / 2
    levels = 2**bits
    # Start from the midpoints of equal-mass cells: already close, so few iterations are needed.
    edges_t = betaincinv(a, a, np.linspace(0.0, 1.0, levels + 1))
    centroids = 2 * edges_t[:-1] - 1 + (edges_t[1:] - edges_t[:-1])
    for _ in range(max_iter):
        inner = (centroids[1:] + centroids[:-1]) / 2
        t = np.concatenate([[0.0], (inner + 1) / 2, [1.0]])
        mass = np.diff(betainc(a, a, t))
        first_t = 0.5 * np.diff(betainc(a + 1, a, t))
        new = (2 * first_t - mass) / mass  # E[x | cell] with x = 2t - 1
        new = (new - new[::-1]) / 2  # the density is even: keep the codebook exactly symmetric
        if np.max(np.abs(new - centroids)) < tol:
            centroids = new
            break
        centroids = new
    return centroids


def coordinate_mse(head_dim: int, centroids: np.ndarray) -> float:
    """E[(x - c(x))^2] for one coordinate; times head_dim it is TurboQuant's D_mse of a unit vector."""
    from scipy.special import betainc

    a = (head_dim - 1) / 2
    inner = (centroids[1:] + centroids[:-1]) / 2
    mass = np.diff(betainc(a, a, np.concatenate([[0.0], (inner + 1) / 2, [1.0]])))
    # Centroids are cell means, so E[(x - c)^2] = E[x^2] - sum P_i c_i^2 with E[x^2] = 1/d.
    return 1.0 / head_dim - float(np.sum(mass * centroids**2))


@cache
def _shipped() -> dict:
    try:
        data = json.loads(DATA_FILE.read_text())
    except (OSError, ValueError) as err:
        logger.warning("cannot read shipped codebooks %s (%s); solving them at start-up", DATA_FILE, err)
        return {}
    if data.get("format") != _FORMAT:
        logger.warning(
            "codebooks %s have format %r, expected %d; solving at start-up", DATA_FILE, data.get("format"), _FORMAT
        )
        return {}
    return data["codebooks"]


@cache
def centroids(head_dim: int, bits: int) -> torch.Tensor:
    """Sorted centroids (2**bits,) float32 for (head_dim, bits): shipped data, else solved once and cached."""
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"unsupported codebook bits {bits!r}: supported values are {CODEBOOK_BITS}")
    if head_dim < 2:
        raise ValueError(f"head_dim must be >= 2, got {head_dim}")
    shipped = _shipped().get(str(head_dim), {}).get(str(bits))
    values = np.asarray(shipped, dtype=np.float64) if shipped is not None else solve_lloyd_max(head_dim, bits)
    return torch.from_numpy(values).to(torch.float32)


def boundaries(head_dim: int, bits: int) -> torch.Tensor:
    """Decision boundaries (2**bits - 1,) float32: midpoints between neighbouring centroids."""
    c = centroids(head_dim, bits).double()
    return ((c[1:] + c[:-1]) / 2).float()


def write_data(path: Path = DATA_FILE) -> dict:
    books = {str(d): {str(b): solve_lloyd_max(d, b).tolist() for b in CODEBOOK_BITS} for d in SUPPORTED_HEAD_DIMS}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": _FORMAT, "codebooks": books}, indent=1) + "\n")
    return books


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Solve the Lloyd-Max codebooks and write them as shipped data.")
    parser.add_argument("--write", action="store_true", help=f"write {DATA_FILE}")
    args = parser.parse_args(argv)
    books = write_data() if args.write else None
    for d in SUPPORTED_HEAD_DIMS:
        row = []
        for b in CODEBOOK_BITS:
            c = np.asarray(books[str(d)][str(b)]) if books else solve_lloyd_max(d, b)
            row.append(f"b={b}: D_mse={d * coordinate_mse(d, c):.5f}")
        print(f"d={d:4d}  " + "  ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
