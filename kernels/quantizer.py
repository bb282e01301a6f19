"""TurboQuant (Zandieh et al., arXiv 2504.19874) in plain torch: quantize to the packed layout and back.

mse variant (TurboQuant_mse, Algorithm 1), for x in R^d:
    n = ||x||,  y = R (x / n),  idx_j = argmin_c |y_j - c|  (Lloyd-Max codebook of f_d),  store (idx, n)
    x~ = n R^T c[idx]
prod variant (TurboQuant_prod, Algorithm 2): (b-1)-bit mse codes, then 1-bit QJL of the residual r = y - c[idx],
done in the rotated domain (S R^T is again an i.i.d. Gaussian matrix, so this is QJL on the original residual):
    gamma = ||r||,  s = sign(S r),  store (idx, s, n, gamma)
    x~ = n R^T (c[idx] + c_d * gamma * S^T s)      (unbiased: E<q, x~> = <q, x>; c_d ~ sqrt(pi/2)/d, qjl_scale)
Norm correction (optional, mse only): store n / ||c[idx]|| instead of n, so that ||x~|| = ||x||.

Ties: a coordinate exactly on a boundary takes the lower code (torch.bucketize, right=False); the Triton write
kernel counts boundaries strictly below the value, which is the same rule.

Extreme vectors (real models have K/V coordinates of 1e4-1e5): the norm is computed on x scaled by a power of two,
2^-e with e the binary exponent of max |x_j| (clamped to [-126, 126]), so that neither the squares of huge inputs
(bf16 near its max) overflow float32 nor those of denormal inputs underflow to 0; a power of two scales exactly, so
an ordinary vector gets bitwise the same u = x / n as without it. A norm beyond the largest finite value of the norm
dtype (65504 for float16, the default) is stored saturated at that value, never as inf, and counted when the caller
passes a counter (`--kv-norm-dtype float32` holds such norms up to 3.4e38). An all-zero vector stores norm 0 and
attends as zero (no division by zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .codebook import boundaries, centroids
from .layout import Plane, VectorLayout
from .packed import PackedVectors
from .rotation import qjl_matrix, qjl_scale, rotation_matrix

_TINY = 1e-30


def norm_limit(norm_dtype: torch.dtype) -> float:
    """The largest finite norm a pool of `norm_dtype` stores: larger norms are saturated to it."""
    return float(torch.finfo(norm_dtype).max)


def power_of_two_scale(x32: torch.Tensor) -> torch.Tensor:
    """x32 (..., d) float32 -> (...,) float32 2^-e, e = frexp exponent of max_j |x_j| clamped to [-126, 126] (so
    the scale is a normal float): x * scale has max |.| in [0.5, 4) (below for zero/denormal-only vectors), is exact,
    and its squares neither overflow nor underflow. The Triton write kernel computes the same bits."""
    amax = x32.abs().amax(dim=-1)
    exponent = ((amax.view(torch.int32) >> 23) & 0xFF) - 126
    return ((127 - exponent.clamp(-126, 126)) << 23).view(torch.float32)


def unpack_plane(codes: torch.Tensor, plane: Plane) -> torch.Tensor:
    """Code rows (..., code_bytes) uint8 -> the plane's values (..., plane.channels) int32."""
    raw = codes[..., plane.offset : plane.offset + plane.nbytes].to(torch.int32)
    mask = (1 << plane.bits) - 1
    return torch.cat([(raw >> (k * plane.bits)) & mask for k in range(plane.per_byte)], dim=-1)


def pack_plane(values: torch.Tensor, plane: Plane) -> torch.Tensor:
    """Values (..., plane.channels) < 2**plane.bits -> (..., plane.nbytes) uint8 (inverse of unpack_plane)."""
    blocks = values.to(torch.int32).reshape(*values.shape[:-1], plane.per_byte, plane.nbytes)
    packed = torch.zeros_like(blocks[..., 0, :])
    for k in range(plane.per_byte):
        packed |= blocks[..., k, :] << (k * plane.bits)
    return packed.to(torch.uint8)


def blockwise_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, m, k) @ w (k, n) -> (B, m, n) as a bmm of B separate (m, k) products: each block's rows come out
    bitwise the same whatever B is. A flat (B*m, k) matmul picks its CPU kernel by its row count, so a row would
    round differently alone and among others (a request decoded alone vs in a batch, a token written alone)."""
    return torch.bmm(x, w.expand(x.shape[0], *w.shape))


def _rotate_each(u: torch.Tensor, rotation_t: torch.Tensor) -> torch.Tensor:
    """u (..., d) @ rotation_t (d, d), each vector on its own on a CPU (blockwise_matmul): its rotated coordinates,
    and so its codes, do not depend on what is written with it (a code on a boundary would flip otherwise)."""
    if u.device.type != "cpu":
        return u @ rotation_t
    return blockwise_matmul(u.reshape(-1, 1, u.shape[-1]), rotation_t).view(u.shape)


def _raw_vectors(packed: PackedVectors) -> torch.Tensor:
    """A raw (16-bit) layout's code rows are the bfloat16 vectors: (..., 2d) uint8 -> (..., d) float32."""
    return packed.codes.contiguous().view(torch.bfloat16).float()


@dataclass(frozen=True)
class _DeviceTensors:
    rotation: torch.Tensor  # (d, d) R
    qjl: torch.Tensor | None  # (d, d) S, prod only
    centroids: tuple[torch.Tensor, ...]  # per segment, (2**bits,)
    boundaries: tuple[torch.Tensor, ...]  # per segment, (2**bits - 1,)


class TurboQuantizer:
    """Quantize/dequantize vectors of one VectorLayout. Use get_quantizer(): instances are cached and immutable."""

    def __init__(self, layout: VectorLayout, *, seed: int = 0, rotation: str = "qr", norm_correction: bool = False):
        if norm_correction and layout.variant != "mse":
            raise ValueError("norm_correction applies to the 'mse' variant only (prod keeps the exact norm)")
        self.layout = layout
        self.seed = seed
        self.rotation_kind = rotation
        self.norm_correction = norm_correction
        self.norm_dtype = getattr(torch, layout.norm_dtype)
        d = layout.head_dim
        codebooks = tuple(centroids(d, s.bits) for s in layout.segments)
        rotation_m = torch.eye(d) if layout.is_raw else rotation_matrix(d, seed, rotation)
        qjl_m = qjl_matrix(d, seed) if layout.variant == "prod" and not layout.is_raw else None
        self._cpu = _DeviceTensors(
            rotation=rotation_m,
            qjl=qjl_m,
            centroids=codebooks,
            boundaries=tuple(boundaries(d, s.bits) for s in layout.segments),
        )
        self._by_device: dict[torch.device, _DeviceTensors] = {torch.device("cpu"): self._cpu}

    def __repr__(self) -> str:
        lay = self.layout
        return f"TurboQuantizer(d={lay.head_dim}, bits={lay.bits}, variant={lay.variant}, seed={self.seed})"

    def tensors(self, device: torch.device | str) -> _DeviceTensors:
        """Rotation, QJL matrix and codebooks on `device` (moved once, then cached)."""
        device = torch.device(device)
        if device not in self._by_device:
            c = self._cpu
            self._by_device[device] = _DeviceTensors(
                rotation=c.rotation.to(device),
                qjl=None if c.qjl is None else c.qjl.to(device),
                centroids=tuple(t.to(device) for t in c.centroids),
                boundaries=tuple(t.to(device) for t in c.boundaries),
            )
        return self._by_device[device]

    @property
    def qjl_scale(self) -> float:
        return qjl_scale(self.layout.head_dim)

    def _check_vectors(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.layout.head_dim:
            raise ValueError(f"expected vectors of head_dim {self.layout.head_dim}, got shape {tuple(x.shape)}")

    def _check_packed(self, packed: PackedVectors) -> None:
        if not isinstance(packed, PackedVectors):
            raise TypeError(f"expected PackedVectors (codes, norms) of {self.layout}, got {type(packed).__name__}")
        packed.check("packed vectors", self.layout)

    def quantize(self, x: torch.Tensor, saturated: torch.Tensor | None = None) -> PackedVectors:
        """(..., head_dim) float -> packed vectors: codes (..., code_bytes) uint8, norms (..., norms_per_vector).

        Norms beyond the norm dtype's range are stored at its largest finite value; `saturated` (an integer tensor
        on x's device), if given, is incremented in place by their number (no host sync)."""
        self._check_vectors(x)
        lay = self.layout
        out = PackedVectors.empty(lay, x.shape[:-1], x.device)
        if lay.is_raw:
            out.codes.copy_(x.to(torch.bfloat16).contiguous().view(torch.uint8))
            return out
        t = self.tensors(x.device)
        x32 = x.float()
        scale = power_of_two_scale(x32)  # exact: see the module docstring
        xs = x32 * scale.unsqueeze(-1)
        norm_s = xs.norm(dim=-1)
        norm = norm_s / scale  # inf beyond float32: saturated below
        y = _rotate_each(xs / norm_s.clamp_min(_TINY).unsqueeze(-1), t.rotation.T)
        need_approx = self.norm_correction or lay.variant == "prod"
        approx = torch.zeros_like(y) if need_approx else None
        for seg, cb, bounds in zip(lay.segments, t.centroids, t.boundaries, strict=True):
            part = y if seg.channels == lay.head_dim else y[..., seg.start : seg.start + seg.channels].contiguous()
            codes = torch.bucketize(part, bounds)
            if need_approx:
                approx[..., seg.start : seg.start + seg.channels] = cb[codes]
            for plane in seg.planes:
                fields = codes if plane.bits == seg.bits else (codes >> plane.shift) & ((1 << plane.bits) - 1)
                out.codes[..., plane.offset : plane.offset + plane.nbytes] = pack_plane(fields, plane)
        stored_norm = norm
        if self.norm_correction:
            stored_norm = norm / approx.norm(dim=-1).clamp_min(_TINY)
        limit = norm_limit(self.norm_dtype)
        if saturated is not None:
            saturated += (stored_norm > limit).sum()
        out.norms[..., 0] = stored_norm.clamp(max=limit)
        if lay.variant == "prod":
            residual = y - approx
            signs = (residual @ t.qjl.T) >= 0
            out.codes[..., lay.qjl_offset : lay.qjl_offset + lay.qjl_bytes] = pack_plane(signs, self.qjl_plane)
            out.norms[..., 1] = residual.norm(dim=-1)
        return out

    @property
    def qjl_plane(self) -> Plane:
        """The 1-bit plane of QJL residual signs over all head_dim coordinates (prod only)."""
        return Plane(offset=self.layout.qjl_offset, bits=1, shift=0, start=0, channels=self.layout.head_dim)

    def codes(self, packed: PackedVectors) -> torch.Tensor:
        """Lloyd-Max codes of all segments, (..., channels of the mse part) int32 (rotated-coordinate order)."""
        self._check_packed(packed)
        parts = [torch.zeros(*packed.shape, 0, dtype=torch.int32, device=packed.device)]
        for seg in self.layout.segments:
            code = torch.zeros(*packed.shape, seg.channels, dtype=torch.int32, device=packed.device)
            for plane in seg.planes:
                code |= unpack_plane(packed.codes, plane) << plane.shift
            parts.append(code)
        return torch.cat(parts, dim=-1)

    def norms(self, packed: PackedVectors) -> torch.Tensor:
        """Stored norms n (...,) float32."""
        return packed.norms[..., 0].float()

    def residual_norms(self, packed: PackedVectors) -> torch.Tensor:
        """Stored residual norms gamma (...,) float32 (prod only)."""
        return packed.norms[..., 1].float()

    def rotated(self, packed: PackedVectors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed vectors -> their rotated-domain reconstruction, never de-rotated:

        values (..., d) = n * c[idx], and for prod qjl (..., d) = n * gamma * qjl_scale * s (else None), so that
        x~ = (values + qjl @ S) @ R  and  <q, x~> = (R q) . values + (S R q) . qjl.
        """
        self._check_packed(packed)
        lay = self.layout
        if lay.is_raw:
            return _raw_vectors(packed), None
        t = self.tensors(packed.device)
        norm = self.norms(packed).unsqueeze(-1)
        values = self.centroids(packed, t)
        values *= norm
        if lay.variant != "prod":
            return values, None
        signs = unpack_plane(packed.codes, self.qjl_plane).float() * 2 - 1
        gamma = self.residual_norms(packed).unsqueeze(-1)
        return values, signs * (norm * gamma * self.qjl_scale)

    def centroids(self, packed: PackedVectors, t: _DeviceTensors | None = None) -> torch.Tensor:
        """c[idx] of all segments, unscaled, (..., d) float32 in rotated-coordinate order (zeros for 1-bit prod,
        which has QJL signs only). The CPU paths decode through byte tables of their own instead."""
        t = t or self.tensors(packed.device)
        code = self.codes(packed).long()
        parts = [torch.zeros(*packed.shape, 0, device=packed.device)]
        for seg, cb in zip(self.layout.segments, t.centroids, strict=True):
            parts.append(cb.float()[code[..., seg.start : seg.start + seg.channels]])
        if len(parts) == 1:
            return torch.zeros(*packed.shape, self.layout.head_dim, device=packed.device)
        return torch.cat(parts, dim=-1)

    def rotate_query(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (..., d) -> (R q, S R q or None) in float32: done once per query, never per key."""
        t = self.tensors(q.device)
        q_rot = q.float() @ t.rotation.T
        return q_rot, (None if t.qjl is None else q_rot @ t.qjl.T)

    def unrotate_output(self, acc: torch.Tensor, acc_qjl: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sums in the rotated domain -> the original domain: (acc + acc_qjl @ S) @ R."""
        t = self.tensors(acc.device)
        if acc_qjl is not None:
            acc = acc + acc_qjl @ t.qjl
        return acc @ t.rotation

    def dequantize(self, packed: PackedVectors) -> torch.Tensor:
        """Packed vectors (...) -> x~ (..., head_dim) float32."""
        return self.unrotate_output(*self.rotated(packed))


@cache
def get_quantizer(
    layout: VectorLayout, seed: int = 0, rotation: str = "qr", norm_correction: bool = False
) -> TurboQuantizer:
    """The cached quantizer of (layout, seed, rotation, norm_correction)."""
    return TurboQuantizer(layout, seed=seed, rotation=rotation, norm_correction=norm_correction)
