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
from .layout import Plane, Segment, VectorLayout
from .packed import PackedVectors
from .rotation import qjl_matrix, qjl_scale, rotation_matrix

_TINY = 1e-30


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


def plane_table(plane: Plane, values: torch.Tensor | None = None) -> torch.Tensor:
    """(256, per_byte) float32: for each byte value, its per_byte fields in plane order, each shifted to the plane's
    place in the code (field << plane.shift), or mapped through `values` (a codebook) when given.

    Decoding a plane is then one row gather per byte, F.embedding(bytes, table) -> (..., nbytes, per_byte), instead
    of per_byte shift/mask passes over the records and an index into the codebook (the CPU decode's main cost)."""
    byte = torch.arange(256).unsqueeze(1)
    fields = (byte >> (torch.arange(plane.per_byte) * plane.bits)) & ((1 << plane.bits) - 1)
    return (fields << plane.shift).float() if values is None else values.float()[fields]


def _gather_rows(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """F.embedding(index, table): (...,) -> (..., width). A float32 table of width 2 (4-bit planes) is read as one
    float64 word per row, which gathers about 1.5x faster on a CPU than rows of two floats."""
    if table.shape[-1] != 2 or table.dtype != torch.float32:
        return torch.nn.functional.embedding(index, table)
    words = table.contiguous().view(torch.float64).view(-1)
    return words.index_select(0, index.reshape(-1)).view(torch.float32).view(*index.shape, 2)


def _plane_fields(codes: torch.Tensor, plane: Plane, table: torch.Tensor, channel_order: bool = True) -> torch.Tensor:
    """Code rows (..., code_bytes) -> the plane's table entries (..., plane.channels), in channel order, or in
    storage order (byte-major: see _storage_channels), which needs no transposing copy."""
    raw = codes[..., plane.offset : plane.offset + plane.nbytes].long()
    fields = _gather_rows(raw, table)  # (..., nbytes, per_byte)
    if not channel_order:
        return fields.flatten(-2)
    return fields.transpose(-1, -2).reshape(*codes.shape[:-1], plane.channels)


def _storage_channels(plane: Plane) -> torch.Tensor:
    """Channel of each field in byte-major order (byte j, field k -> start + k * nbytes + j): (channels,) long."""
    j, k = torch.meshgrid(torch.arange(plane.nbytes), torch.arange(plane.per_byte), indexing="ij")
    return (plane.start + k * plane.nbytes + j).reshape(-1)


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


def split_plane_table(segment: Segment, codebook: torch.Tensor) -> torch.Tensor:
    """A 3-bit segment's codes live in two planes, 2 low bits and 1 high bit, whose bytes hold different channels:
    byte j of the low plane (n2 bytes) holds channels j + k * n2 (k = 0..3), and their high bits sit in byte
    j % n1 of the high plane (n1 = n2 / 2 bytes) at bits j // n1 + 2k. So (high byte >> (j // n1)) & 0x55 has them
    at bits 0, 2, 4, 6, and this (256 * 86, 4) float32 table maps low byte | that << 8 to the four centroids of
    byte j: one row gather per low-plane byte decodes the segment, in the low plane's storage order."""
    low, high = segment.planes
    if (low.bits, low.shift, high.bits, high.shift) != (2, 0, 1, 2) or low.nbytes != 2 * high.nbytes:
        raise ValueError(f"not a 3-bit segment of a 2-bit and a 1-bit plane: {segment}")
    index = torch.arange(256 * (0x55 + 1))
    field = torch.arange(4)
    code = ((index.unsqueeze(1) >> 2 * field) & 3) | (((index.unsqueeze(1) >> 8 + 2 * field) & 1) << 2)
    return codebook.float()[code]


def _split_plane_fields(codes: torch.Tensor, segment: Segment, table: torch.Tensor) -> torch.Tensor:
    """A 3-bit segment (see split_plane_table) of code rows -> its centroids (..., channels) in the low plane's
    storage order."""
    low, high = segment.planes
    high_bytes = codes[..., high.offset : high.offset + high.nbytes]
    high_bits = torch.cat([high_bytes, high_bytes >> 1], dim=-1) & 0x55  # (..., low.nbytes)
    index = codes[..., low.offset : low.offset + low.nbytes].long() | (high_bits.long() << 8)
    return torch.nn.functional.embedding(index, table).flatten(-2)


def _raw_vectors(packed: PackedVectors) -> torch.Tensor:
    """A raw (16-bit) layout's code rows are the bfloat16 vectors: (..., 2d) uint8 -> (..., d) float32."""
    return packed.codes.contiguous().view(torch.bfloat16).float()


@dataclass(frozen=True)
class _DeviceTensors:
    rotation: torch.Tensor  # (d, d) R
    qjl: torch.Tensor | None  # (d, d) S, prod only
    centroids: tuple[torch.Tensor, ...]  # per segment, (2**bits,)
    boundaries: tuple[torch.Tensor, ...]  # per segment, (2**bits - 1,)
    # Per segment, per plane: plane_table of the plane; a one-plane segment's table holds centroids, not codes.
    plane_tables: tuple[tuple[torch.Tensor, ...], ...] = ()
    qjl_table: torch.Tensor | None = None  # plane_table of the QJL sign plane mapping bits to -1/+1 (prod only)
    split_tables: tuple[torch.Tensor | None, ...] = ()  # per segment: split_plane_table of a 3-bit one, else None
    storage_basis: torch.Tensor | None = None  # (E, d) W of storage_decode: its (..., E) rows times W give x~


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
            plane_tables=tuple(
                tuple(plane_table(p, cb if len(seg.planes) == 1 else None) for p in seg.planes)
                for seg, cb in zip(layout.segments, codebooks, strict=True)
            ),
            qjl_table=plane_table(self.qjl_plane, torch.tensor([-1.0, 1.0])) if layout.variant == "prod" else None,
            split_tables=tuple(
                split_plane_table(seg, cb) if len(seg.planes) == 2 else None
                for seg, cb in zip(layout.segments, codebooks, strict=True)
            ),
            storage_basis=self._storage_basis(rotation_m, qjl_m),
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
                plane_tables=tuple(tuple(t.to(device) for t in tables) for tables in c.plane_tables),
                qjl_table=None if c.qjl_table is None else c.qjl_table.to(device),
                split_tables=tuple(None if t is None else t.to(device) for t in c.split_tables),
                storage_basis=c.storage_basis.to(device),
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

    def quantize(self, x: torch.Tensor) -> PackedVectors:
        """(..., head_dim) float -> packed vectors: codes (..., code_bytes) uint8, norms (..., norms_per_vector)."""
        self._check_vectors(x)
        lay = self.layout
        out = PackedVectors.empty(lay, x.shape[:-1], x.device)
        if lay.is_raw:
            out.codes.copy_(x.to(torch.bfloat16).contiguous().view(torch.uint8))
            return out
        t = self.tensors(x.device)
        x32 = x.float()
        norm = x32.norm(dim=-1)
        y = _rotate_each(x32 / norm.clamp_min(_TINY).unsqueeze(-1), t.rotation.T)
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
        out.norms[..., 0] = stored_norm
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
        values = self._centroids(packed.codes, t, channel_order=True)
        values *= norm
        if lay.variant != "prod":
            return values, None
        signs = _plane_fields(packed.codes, self.qjl_plane, t.qjl_table)
        gamma = self.residual_norms(packed).unsqueeze(-1)
        return values, signs * (norm * gamma * self.qjl_scale)

    def _centroids(self, codes: torch.Tensor, t: _DeviceTensors, channel_order: bool) -> torch.Tensor:
        """c[idx] of all segments, unscaled, (..., d) float32: in channel order, or in storage order, the order of
        t.storage_basis's first d rows (each segment as its first plane stores it)."""
        parts = []
        for seg, cb, tables, split in zip(
            self.layout.segments, t.centroids, t.plane_tables, t.split_tables, strict=True
        ):
            if len(seg.planes) == 1:  # the table maps bytes straight to centroids
                parts.append(_plane_fields(codes, seg.planes[0], tables[0], channel_order))
            elif not channel_order:
                parts.append(_split_plane_fields(codes, seg, split))
            else:
                code = sum(_plane_fields(codes, plane, table) for plane, table in zip(seg.planes, tables, strict=True))
                parts.append(torch.nn.functional.embedding(code.long(), cb.unsqueeze(1)).squeeze(-1))
        if not parts:  # 1-bit prod: QJL signs only, no codes
            return torch.zeros(*codes.shape[:-1], self.layout.head_dim, dtype=torch.float32, device=codes.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def storage_decode(self, packed: PackedVectors) -> torch.Tensor:
        """Packed vectors (...) -> y (..., E) float32 in the storage basis W = tensors(device).storage_basis
        (E, d), so that x~ = y @ W: <q, x~> = (q @ W.T) . y and sum_i p_i x~_i = (sum_i p_i y_i) @ W.

        mse: y = n * c[idx] with the coordinates in the order they are stored (E = d); prod: then
        n * gamma * qjl_scale * s, the QJL signs in the order of their plane (E = 2d); raw: the vector (W = I).
        For the CPU decode (torch_batched.py): one row gather per packed byte and no transposes; the query and the
        output are turned into and out of this basis once per query, by one matmul each."""
        self._check_packed(packed)
        lay = self.layout
        if lay.is_raw:
            return _raw_vectors(packed)
        t = self.tensors(packed.device)
        norms = self.norms(packed).unsqueeze(-1)
        values = self._centroids(packed.codes, t, channel_order=False)
        values *= norms
        if lay.variant != "prod":
            return values
        signs = _plane_fields(packed.codes, self.qjl_plane, t.qjl_table, channel_order=False)
        signs *= norms * self.residual_norms(packed).unsqueeze(-1) * self.qjl_scale
        return torch.cat([values, signs], dim=-1)

    def _storage_basis(self, rotation: torch.Tensor, qjl: torch.Tensor | None) -> torch.Tensor:
        """W of storage_decode, (E, d): the rows of R in storage order, then for prod the rows of S R in the order of
        the sign plane. Raw layouts: R is the identity, and so is W."""
        order = [_storage_channels(seg.planes[0]) for seg in self.layout.segments]
        basis = rotation[torch.cat(order)] if order else rotation  # raw, and 1-bit prod's zero values: no order
        if qjl is not None:
            basis = torch.cat([basis, (qjl @ rotation)[_storage_channels(self.qjl_plane)]])
        return basis.contiguous()

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
