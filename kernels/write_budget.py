"""How far a fused write may differ from reference.write_kv on the same vectors (the Triton write and the CPU kernel's
write; tests, the autotuner and the GPU check hold them to it).

A fused write sums the norm and the rotation in another order than torch does, so a rotated coordinate within rounding
of a codebook boundary may take the neighbouring code: at most MAX_CODE_FLIPS of the codes, each by one level. A prod
record then gets another residual, so its QJL signs may differ on at most MAX_SIGN_FLIPS of them. Norms within one
ulp of their dtype.
"""

from __future__ import annotations

import torch

from .packed import PackedVectors
from .quantizer import TurboQuantizer, unpack_plane

MAX_CODE_FLIPS = 1e-3
MAX_SIGN_FLIPS = 2e-2
NORM_RTOL = {torch.float16: 2**-10, torch.float32: 1e-6}


def write_mismatch(got: PackedVectors, want: PackedVectors, quantizer: TurboQuantizer) -> str | None:
    """None when a write `got` matches the reference's `want` (same vectors) within the flip budget: codes equal
    except at most MAX_CODE_FLIPS of them, each by one level; QJL signs within MAX_SIGN_FLIPS; norms within one ulp.
    Otherwise what differs."""
    lay = quantizer.layout
    if lay.is_raw:
        return None if torch.equal(got.codes, want.codes) else "raw bf16 rows differ"
    codes_got, codes_want = quantizer.codes(got), quantizer.codes(want)
    diff = (codes_got - codes_want).abs()
    if diff.numel() and int(diff.max()) > 1:
        return f"a code moved by {int(diff.max())} levels (a boundary flip moves it by one)"
    flips = float((diff > 0).float().mean()) if diff.numel() else 0.0
    if flips > MAX_CODE_FLIPS:
        return f"{flips:.2e} of the codes differ (budget {MAX_CODE_FLIPS:.0e})"
    norm_tol = 2 * NORM_RTOL[got.norms.dtype]
    n_got, n_want = quantizer.norms(got), quantizer.norms(want)
    n_rel = float(((n_got - n_want).abs() / n_want.abs().clamp_min(1e-30)).max()) if n_got.numel() else 0.0
    if n_rel > norm_tol:
        return f"norms differ by {n_rel:.2e} relative (tolerance {norm_tol:.1e})"
    if lay.variant == "prod":
        plane = quantizer.qjl_plane
        sign_flips = float((unpack_plane(got.codes, plane) != unpack_plane(want.codes, plane)).float().mean())
        if sign_flips > MAX_SIGN_FLIPS:
            return f"{sign_flips:.2e} of the QJL signs differ (budget {MAX_SIGN_FLIPS:.0e})"
        # gamma = ||y - c||: a flipped code changes it by up to the flip's share of the residual
        g_got, g_want = quantizer.residual_norms(got), quantizer.residual_norms(want)
        if not torch.allclose(g_got, g_want, rtol=1e-2, atol=1e-3):
            return f"residual norms differ by up to {float((g_got - g_want).abs().max()):.2e}"
    return None
