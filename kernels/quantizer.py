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
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .codebook import boundaries, centroids
from .layout import Plane, VectorLayout
from .rotation import qjl_matrix, qjl_scale, rotation_matrix

_TINY = 1e-30


def unpack_plane(packed: torch.Tensor, plane: Plane) -> torch.Tensor:
    """(..., bytes_per_vector) uint8 -> the plane's values (..., plane.channels) int32."""
    raw = packed[..., plane.offset : plane.offset + plane.nbytes].to(torch.int32)
    mask = (1 << plane.bits) - 1
    return torch.cat([(raw >> (k * plane.bits)) & mask for k in range(plane.per_byte)], dim=-1)


def pack_plane(values: torch.Tensor, plane: Plane) -> torch.Tensor:
    """Values (..., plane.channels) < 2**plane.bits -> (..., plane.nbytes) uint8 (inverse of unpack_plane)."""
    blocks = values.to(torch.int32).reshape(*values.shape[:-1], plane.per_byte, plane.nbytes)
    packed = torch.zeros_like(blocks[..., 0, :])
    for k in range(plane.per_byte):
        packed |= blocks[..., k, :] << (k * plane.bits)
    return packed.to(torch.uint8)


def read_scalar(packed: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """A little-endian scalar stored at byte `offset` of each record -> (...,) float32."""
    size = torch.finfo(dtype).bits // 8
    return packed[..., offset : offset + size].contiguous().view(dtype).squeeze(-1).float()


def write_scalar(out: torch.Tensor, offset: int, values: torch.Tensor, dtype: torch.dtype) -> None:
    size = torch.finfo(dtype).bits // 8
    out[..., offset : offset + size] = values.to(dtype).unsqueeze(-1).contiguous().view(torch.uint8)


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
        self._cpu = _DeviceTensors(
            rotation=torch.eye(d) if layout.is_raw else rotation_matrix(d, seed, rotation),
            qjl=qjl_matrix(d, seed) if layout.variant == "prod" and not layout.is_raw else None,
            centroids=tuple(centroids(d, s.bits) for s in layout.segments),
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

    def _check_packed(self, packed: torch.Tensor) -> None:
        if packed.dtype != torch.uint8 or packed.shape[-1] != self.layout.bytes_per_vector:
            raise ValueError(
                f"expected uint8 records of {self.layout.bytes_per_vector} bytes ({self.layout}), "
                f"got {packed.dtype} of shape {tuple(packed.shape)}"
            )

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., head_dim) float -> packed records (..., bytes_per_vector) uint8."""
        self._check_vectors(x)
        lay = self.layout
        if lay.is_raw:
            return x.to(torch.bfloat16).contiguous().view(torch.uint8)
        t = self.tensors(x.device)
        x32 = x.float()
        norm = x32.norm(dim=-1)
        y = (x32 / norm.clamp_min(_TINY).unsqueeze(-1)) @ t.rotation.T
        out = torch.zeros(*x.shape[:-1], lay.bytes_per_vector, dtype=torch.uint8, device=x.device)
        approx = torch.zeros_like(y)
        for seg, cb, bounds in zip(lay.segments, t.centroids, t.boundaries, strict=True):
            part = slice(seg.start, seg.start + seg.channels)
            codes = torch.bucketize(y[..., part].contiguous(), bounds)
            approx[..., part] = cb[codes]
            for plane in seg.planes:
                mask = (1 << plane.bits) - 1
                out[..., plane.offset : plane.offset + plane.nbytes] = pack_plane((codes >> plane.shift) & mask, plane)
        stored_norm = norm
        if self.norm_correction:
            stored_norm = norm / approx.norm(dim=-1).clamp_min(_TINY)
        write_scalar(out, lay.norm_offset, stored_norm, self.norm_dtype)
        if lay.variant == "prod":
            residual = y - approx
            signs = (residual @ t.qjl.T) >= 0
            out[..., lay.qjl_offset : lay.qjl_offset + lay.qjl_bytes] = pack_plane(signs, self.qjl_plane)
            write_scalar(out, lay.rnorm_offset, residual.norm(dim=-1), self.norm_dtype)
        return out

    @property
    def qjl_plane(self) -> Plane:
        """The 1-bit plane of QJL residual signs over all head_dim coordinates (prod only)."""
        return Plane(offset=self.layout.qjl_offset, bits=1, shift=0, start=0, channels=self.layout.head_dim)

    def codes(self, packed: torch.Tensor) -> torch.Tensor:
        """Lloyd-Max codes of all segments, (..., channels of the mse part) int32 (rotated-coordinate order)."""
        self._check_packed(packed)
        parts = [torch.zeros(*packed.shape[:-1], 0, dtype=torch.int32, device=packed.device)]
        for seg in self.layout.segments:
            code = torch.zeros(*packed.shape[:-1], seg.channels, dtype=torch.int32, device=packed.device)
            for plane in seg.planes:
                code |= unpack_plane(packed, plane) << plane.shift
            parts.append(code)
        return torch.cat(parts, dim=-1)

    def norms(self, packed: torch.Tensor) -> torch.Tensor:
        """Stored norms (...,) float32."""
        return read_scalar(packed, self.layout.norm_offset, self.norm_dtype)

    def rotated(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed records -> their rotated-domain reconstruction, never de-rotated:

        values (..., d) = n * c[idx], and for prod qjl (..., d) = n * gamma * qjl_scale * s (else None), so that
        x~ = (values + qjl @ S) @ R  and  <q, x~> = (R q) . values + (S R q) . qjl.
        """
        self._check_packed(packed)
        lay = self.layout
        if lay.is_raw:
            return packed.contiguous().view(torch.bfloat16).float(), None
        t = self.tensors(packed.device)
        norm = self.norms(packed).unsqueeze(-1)
        values = torch.zeros(*packed.shape[:-1], lay.head_dim, dtype=torch.float32, device=packed.device)
        codes = self.codes(packed)
        for seg, cb in zip(lay.segments, t.centroids, strict=True):
            values[..., seg.start : seg.start + seg.channels] = cb[codes[..., seg.start : seg.start + seg.channels]]
        values *= norm
        if lay.variant != "prod":
            return values, None
        signs = unpack_plane(packed, self.qjl_plane).float() * 2 - 1
        gamma = read_scalar(packed, lay.rnorm_offset, self.norm_dtype).unsqueeze(-1)
        return values, signs * (norm * gamma * self.qjl_scale)

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

    def dequantize(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed records (..., bytes_per_vector) -> x~ (..., head_dim) float32."""
        return self.unrotate_output(*self.rotated(packed))


@cache
def get_quantizer(
    layout: VectorLayout, seed: int = 0, rotation: str = "qr", norm_correction: bool = False
) -> TurboQuantizer:
    """The cached quantizer of (layout, seed, rotation, norm_correction)."""
    return TurboQuantizer(layout, seed=seed, rotation=rotation, norm_correction=norm_correction)
