"""Quantizer distortion against the paper: `python -m tq_serve.bench distortion --head-dim 128 --bits 1 2 3 4`.

Over random unit vectors x, y (seeded) and x~ = dequantize(quantize(x)):
    d_mse   = E ||x - x~||^2                 (TurboQuant Theorem 1)
    d_prod  = E (<y, x> - <y, x~>)^2         (Theorem 2; unbiased for prod: ip_bias = E(<y, x> - <y, x~>) ~ 0)
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from tq_serve.kernels.layout import SUPPORTED_HEAD_DIMS, VectorLayout, parse_bits
from tq_serve.kernels.quantizer import get_quantizer

# Measured values the paper reports at d=128 (Table/figure of section 4.1), and its upper bounds.
PAPER_D_MSE = {1: 0.361, 2: 0.116, 3: 0.034, 4: 0.0093}
PAPER_D_PROD_TIMES_D = {1: 1.56, 2: 0.55, 3: 0.18, 4: 0.052}


def mse_upper_bound(bits: float) -> float:
    return math.sqrt(3) * math.pi / 2 * 4.0**-bits


def measure(
    head_dim: int,
    bits: float,
    variant: str,
    *,
    samples: int = 100_000,
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    chunk: int = 25_000,
) -> dict:
    layout = VectorLayout(head_dim=head_dim, bits=bits, variant=variant)
    quantizer = get_quantizer(layout, seed=0, rotation=rotation, norm_correction=norm_correction)
    gen = torch.Generator().manual_seed(seed)
    sq_err = ip_err = ip_sq = 0.0
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        x = torch.randn(n, head_dim, generator=gen, dtype=torch.float64)
        y = torch.randn(n, head_dim, generator=gen, dtype=torch.float64)
        x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
        x_hat = quantizer.dequantize(quantizer.quantize(x.float())).double()
        err = ((y * x).sum(-1) - (y * x_hat).sum(-1)).double()
        sq_err += ((x - x_hat) ** 2).sum(-1).sum().item()
        ip_err += err.sum().item()
        ip_sq += (err**2).sum().item()
    return {
        "head_dim": head_dim,
        "bits": bits,
        "variant": variant,
        "d_mse": sq_err / samples,
        "d_prod": ip_sq / samples,
        "ip_bias": ip_err / samples,
        "bytes_per_vector": layout.bytes_per_vector,
        "samples": samples,
        "rotation": rotation,
        "norm_correction": norm_correction,
    }


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'bits':>5} {'variant':>7} {'bytes':>5} {'d_mse':>9} {'paper':>7} {'bound':>7} "
        f"{'d_prod*d':>9} {'paper':>7} {'ip_bias':>9}"
    ]
    for r in rows:
        d = r["head_dim"]
        paper_mse = PAPER_D_MSE.get(r["bits"]) if r["variant"] == "mse" and d == 128 else None
        paper_prod = PAPER_D_PROD_TIMES_D.get(r["bits"]) if r["variant"] == "prod" and d == 128 else None
        lines.append(
            f"{r['bits']:>5} {r['variant']:>7} {r['bytes_per_vector']:>5} {r['d_mse']:>9.5f} "
            f"{paper_mse if paper_mse is not None else '-':>7} {mse_upper_bound(r['bits']):>7.4f} "
            f"{r['d_prod'] * d:>9.5f} {paper_prod if paper_prod is not None else '-':>7} {r['ip_bias']:>+9.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench distortion", description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128, help=f"one of {SUPPORTED_HEAD_DIMS}")
    parser.add_argument("--bits", nargs="+", default=["1", "2", "3", "4"], help="bits values (1 2 2.5 3 3.5 4)")
    parser.add_argument("--variants", nargs="+", default=["mse", "prod"], choices=["mse", "prod"])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotation", default="qr", choices=["qr", "hadamard"])
    parser.add_argument("--norm-correction", action="store_true")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    args = parser.parse_args(argv)
    rows = []
    try:
        for bits in map(parse_bits, args.bits):
            for variant in args.variants:
                if variant == "prod" and bits != int(bits):
                    continue  # prod is defined for integer bits only
                rows.append(
                    measure(
                        args.head_dim,
                        bits,
                        variant,
                        samples=args.samples,
                        seed=args.seed,
                        rotation=args.rotation,
                        norm_correction=args.norm_correction and variant == "mse",
                    )
                )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else _table(rows))
    return 0
