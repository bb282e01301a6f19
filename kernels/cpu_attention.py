"""Decode and extend attention over the packed pool on a CPU, by a C++/OpenMP kernel that reads the code rows.

The same semantics as reference.decode_attention / extend_attention (the specification; tests compare them on the
same packed data). kernels/torch_batched.py unpacks every code of the batch into fp32 K/V before attending, which
writes and reads 8 bytes per coordinate where bf16 reads 2; this kernel streams each request's code rows and norms
once per (request, KV head), straight from the pool through its slot indices, and decodes one key at a time (decode)
or one tile of 64 keys (extend) into L1-sized buffers:

    query   qs = q @ W_k^T          W: the quantizer's storage basis (E, d), rows of R (and S R for prod) in the
                                       order the code bytes hold the coordinates, so a byte decodes to adjacent floats
    score   s_i = sm_scale * (n_i c_i . qs [+ n_i gamma_i c_d s_i . qs_qjl])    c_i: centroids by byte tables
    output  out = (sum_i p_i y_i / sum_i p_i) @ W_v    y_i = (n_i c_i [, n_i gamma_i c_d s_i]), online softmax (fp32)

Sliding window (sliding_window_size W, the reference's semantics): a decode starts at its window (its last W + 1
keys), an extend block at the key tile of its first row's window start, each row masked to its own window; keys
outside every window are never read (csrc/cpu_attention.cpp).

Everything after q.float() is the kernel's own fixed-order arithmetic, including both basis changes
(csrc/cpu_attention.cpp explains the order), so a request's output is bitwise the same alone or in a batch, with its
prefix cached or computed, and on any number of threads.

Build: the C++ source (no torch headers) is compiled with the system C++ compiler on first use, `-O3 -march=native
-fopenmp`, without -ffast-math (which would let the compiler reorder the reductions), into a per-user cache keyed by
a hash of the source, the flags, the compiler and the CPU, and loaded with ctypes. Where no compiler is found or the
build fails, the ops fall back to kernels/torch_batched.py with one log line.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from . import reference, torch_batched
from .launch_checks import check_kv_vectors, check_pool, check_slots
from .packed import PackedVectors
from .quantizer import TurboQuantizer, norm_limit
from .reference import _extend_bounds, window_of

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_attention.cpp"
# -ffp-contract=fast is GCC's default, spelled out: a multiply-add is fused the same way wherever it is compiled.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
ABI_VERSION = 3
# Below this many (key, KV head) pairs a decode step runs on one thread: a parallel region's barrier costs more than
# the work, and waits for a core that the server's other processes may hold. The result does not depend on it.
PARALLEL_MIN_KEYS = 16384
_MAX_OPS = 8


class _DecodeOp(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("src", ctypes.c_int32),
        ("nbytes", ctypes.c_int32),
        ("src2", ctypes.c_int32),
        ("dst", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("table", ctypes.c_void_p),
    ]


class _VectorSpec(ctypes.Structure):
    _fields_ = [
        ("code_bytes", ctypes.c_int32),
        ("width", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("norms_per_vector", ctypes.c_int32),
        ("norm_is_f32", ctypes.c_int32),
        ("n_ops", ctypes.c_int32),
        ("zero_values", ctypes.c_int32),
        ("qjl_scale", ctypes.c_float),
        ("ops", _DecodeOp * _MAX_OPS),
    ]


class _PoolView(ctypes.Structure):
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("code_slot_stride", ctypes.c_int64),
        ("code_head_stride", ctypes.c_int64),
        ("norms", ctypes.c_void_p),
        ("norm_slot_stride", ctypes.c_int64),
        ("norm_head_stride", ctypes.c_int64),
    ]


class _EncodePlane(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("shift", ctypes.c_int32),
        ("nbytes", ctypes.c_int32),
    ]


class _EncodeSegment(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_int32),
        ("channels", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("n_planes", ctypes.c_int32),
        ("boundaries", ctypes.c_float * 15),
        ("centroids", ctypes.c_float * 16),
        ("planes", _EncodePlane * 2),
    ]


class _EncodeSpec(ctypes.Structure):
    _fields_ = [
        ("head_dim", ctypes.c_int32),
        ("code_bytes", ctypes.c_int32),
        ("raw", ctypes.c_int32),
        ("n_segments", ctypes.c_int32),
        ("prod", ctypes.c_int32),
        ("qjl_offset", ctypes.c_int32),
        ("norms_per_vector", ctypes.c_int32),
        ("norm_is_f32", ctypes.c_int32),
        ("norm_correction", ctypes.c_int32),
        ("norm_limit", ctypes.c_float),
        ("rotation_t", ctypes.c_void_p),
        ("qjl_t", ctypes.c_void_p),
        ("segments", _EncodeSegment * 2),
    ]


# ------------------------------------------------------------------------------------------------------------ build


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++")


def _cpu_identity() -> str:
    """The CPU model and feature flags: -march=native code built on one CPU may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))


def _cache_dir() -> Path:
    home_cache = Path.home() / ".cache" / "tq_serve" / "cpu_attention"
    try:
        home_cache.mkdir(parents=True, exist_ok=True)
        return home_cache
    except OSError:  # a read-only home (some CI runners): the temp dir, per user
        fallback = Path(tempfile.gettempdir()) / f"tq_serve-{os.getuid()}" / "cpu_attention"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def library_path(compiler: str) -> Path:
    """Where the library built from SOURCE with FLAGS by `compiler` on this CPU lives (it may not exist yet)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (SOURCE.read_text(), " ".join(FLAGS), version, _cpu_identity()))
    ).hexdigest()[:16]
    return _cache_dir() / f"cpu_attention-{key}.so"


def build_library(compiler: str | None = None) -> Path:
    """Compile SOURCE (about 3 s) unless this source, flags, compiler and CPU already have a build; return its path.
    Raises RuntimeError when no compiler is found or the build fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    path = library_path(compiler)
    if path.exists():
        return path
    # Built under a unique name and renamed: several processes (SGLang's scheduler ranks) may build at once.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (logged once) where it cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(build_library()))
        if lib.tq_abi_version() != ABI_VERSION:
            raise RuntimeError(f"library ABI {lib.tq_abi_version()}, expected {ABI_VERSION}")
    except (OSError, RuntimeError) as err:
        logger.warning("CPU attention kernel unavailable, using the torch path (kernels/torch_batched.py): %s", err)
        return None
    i32, i64, f32, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    spec = ctypes.POINTER(_VectorSpec)
    query = [ptr, i32, i64, i64]  # q, io_is_bf16, row and head strides
    pools = [spec, _PoolView, ptr, spec, _PoolView, ptr, i64]  # K spec, pool, basis^T; V spec, pool, basis; slots
    kv = [ptr, i32, ptr, i32, i64]  # kv_indptr, its width, kv_indices, its width, their number
    tail = [i32, i32, i32, f32, f32, i32, ptr, i32, i64]  # batch, heads, group, scale, cap, window, out, threads
    lib.tq_decode.argtypes = [*query, *pools, *kv, *tail]
    lib.tq_extend.argtypes = [*query, i64, *pools, ptr, i32, *kv, *tail]
    lib.tq_write_vectors.argtypes = [ctypes.POINTER(_EncodeSpec), _PoolView, i64, ptr, i32, i64, i64, i64, i32]
    lib.tq_write_vectors.argtypes += [ptr, i32, ptr, i32]
    return lib


def available() -> bool:
    """Whether the compiled kernel serves the ops here (else they fall back to the torch path)."""
    return load_library() is not None


# -------------------------------------------------------------------------------------------------- layout tables


def _byte_fields(bits: int) -> torch.Tensor:
    """(256, 8 // bits) long: the fields of each byte value, lowest bits first."""
    per_byte = 8 // bits
    return (torch.arange(256).unsqueeze(1) >> (torch.arange(per_byte) * bits)) & ((1 << bits) - 1)


@dataclass(frozen=True)
class KernelLayout:
    """What the kernel needs of one quantizer: its decode spec (with the tables it points to) and basis W (E, d)."""

    spec: _VectorSpec
    tables: tuple[torch.Tensor, ...]  # kept alive: spec holds their addresses
    basis: torch.Tensor  # (E, d): decoded row y (E,) -> x~ = y @ W
    basis_t: torch.Tensor  # (d, E) contiguous: q -> q @ W^T


@cache
def kernel_layout(quantizer: TurboQuantizer, simd: bool) -> KernelLayout:
    """The decode spec and storage basis of `quantizer` (cached per quantizer; quantizers are cached and immutable).

    Table ops decode byte by byte, byte j's fields k = 0.. to adjacent floats (field k of byte j is channel
    start + k * nbytes + j, layout.py); `simd` ops (AVX2 builds, planes of a multiple of 8 bytes) decode 8 bytes at a
    time into channel order. Either way the basis row of each decoded float is the rotation's row of its channel."""
    lay = quantizer.layout
    d = lay.head_dim
    t = quantizer.tensors("cpu")
    ops, tables, channels = [], [], []

    def add(kind: int, src: int, nbytes: int, dst: int, table: torch.Tensor | None, src2: int = 0) -> None:
        op = _DecodeOp(kind=kind, src=src, nbytes=nbytes, src2=src2, dst=dst, pad=0)
        if table is not None:
            tables.append(table)
            op.table = table.data_ptr()
        ops.append(op)

    def padded(codebook: torch.Tensor) -> torch.Tensor:
        # repeated to 16 entries: an AVX-512 lookup reads the low 4 bits of a lane, whatever the code's width
        return codebook.float().repeat(16 // codebook.numel()).contiguous()

    def plane_channels(start: int, nbytes: int, per_byte: int, vectorised: bool) -> torch.Tensor:
        if vectorised:
            return torch.arange(start, start + nbytes * per_byte)
        j, k = torch.meshgrid(torch.arange(nbytes), torch.arange(per_byte), indexing="ij")
        return (start + k * nbytes + j).reshape(-1)

    if lay.is_raw:
        add(5, 0, lay.code_bytes, 0, None)
        basis = torch.eye(d)
    else:
        pos = 0
        for seg, codebook in zip(lay.segments, t.centroids, strict=True):
            first = seg.planes[0]
            if len(seg.planes) == 1:
                vectorised = simd and first.nbytes % 8 == 0
                if vectorised:
                    add({4: 11, 2: 12, 1: 13}[first.bits], first.offset, first.nbytes, pos, padded(codebook))
                else:
                    table = codebook.float()[_byte_fields(first.bits)].contiguous()
                    add({4: 1, 2: 2, 1: 3}[first.bits], first.offset, first.nbytes, pos, table)
            else:
                high = seg.planes[1]
                if (first.bits, high.bits, first.nbytes) != (2, 1, 2 * high.nbytes):
                    raise ValueError(f"unsupported segment planes {seg.planes}")
                vectorised = simd and high.nbytes % 8 == 0
                table = padded(codebook) if vectorised else torch_batched.split_plane_table(seg, codebook).contiguous()
                add(14 if vectorised else 4, first.offset, first.nbytes, pos, table, src2=high.offset)
            channels.append(plane_channels(seg.start, first.nbytes, first.per_byte, vectorised))
            pos += seg.channels
        rows = t.rotation[torch.cat(channels)] if channels else torch.zeros(d, d)
        if lay.variant == "prod":
            vectorised = simd and lay.qjl_bytes % 8 == 0
            signs = torch.tensor([-1.0, 1.0])
            add(
                13 if vectorised else 3,
                lay.qjl_offset,
                lay.qjl_bytes,
                d,
                padded(signs) if vectorised else signs[_byte_fields(1)].contiguous(),
            )
            qjl_rows = (t.qjl @ t.rotation)[plane_channels(0, lay.qjl_bytes, 8, vectorised)]
            rows = torch.cat([rows, qjl_rows])
        basis = rows.float().contiguous()
    spec = _VectorSpec(
        code_bytes=lay.code_bytes,
        width=basis.shape[0],
        head_dim=d,
        norms_per_vector=lay.norms_per_vector,
        norm_is_f32=int(lay.norm_dtype == "float32"),
        n_ops=len(ops),
        zero_values=int(not lay.is_raw and not lay.segments),
        qjl_scale=quantizer.qjl_scale,
    )
    for i, op in enumerate(ops):
        spec.ops[i] = op
    return KernelLayout(spec=spec, tables=tuple(tables), basis=basis, basis_t=basis.T.contiguous())


@dataclass(frozen=True)
class EncodeLayout:
    """What the kernel's write needs of one quantizer: its encode spec and the matrices it points to."""

    spec: _EncodeSpec
    tensors: tuple[torch.Tensor, ...]  # kept alive: spec holds their addresses


@cache
def encode_layout(quantizer: TurboQuantizer) -> EncodeLayout:
    """The encode spec of `quantizer` (cached per quantizer): segments with their boundaries, centroids and planes,
    R^T and (prod) S^T, the norm dtype, its saturation limit and the norm correction."""
    lay = quantizer.layout
    t = quantizer.tensors("cpu")
    rotation_t = t.rotation.T.contiguous().float()
    qjl_t = t.qjl.T.contiguous().float() if t.qjl is not None else rotation_t
    spec = _EncodeSpec(
        head_dim=lay.head_dim,
        code_bytes=lay.code_bytes,
        raw=int(lay.is_raw),
        n_segments=len(lay.segments),
        prod=int(lay.variant == "prod" and not lay.is_raw),
        qjl_offset=lay.qjl_offset,
        norms_per_vector=lay.norms_per_vector,
        norm_is_f32=int(lay.norm_dtype == "float32"),
        norm_correction=int(quantizer.norm_correction),
        norm_limit=norm_limit(quantizer.norm_dtype),
        rotation_t=rotation_t.data_ptr(),
        qjl_t=qjl_t.data_ptr(),
    )
    for i, (seg, bounds, codebook) in enumerate(zip(lay.segments, t.boundaries, t.centroids, strict=True)):
        out = spec.segments[i]
        out.start, out.channels, out.bits, out.n_planes = seg.start, seg.channels, seg.bits, len(seg.planes)
        for j, value in enumerate(bounds.float().tolist()):
            out.boundaries[j] = value
        for j, value in enumerate(codebook.float().tolist()):
            out.centroids[j] = value
        for j, plane in enumerate(seg.planes):
            out.planes[j] = _EncodePlane(offset=plane.offset, bits=plane.bits, shift=plane.shift, nbytes=plane.nbytes)
    return EncodeLayout(spec=spec, tensors=(rotation_t, qjl_t))


# ------------------------------------------------------------------------------------------------------------- ops

# Pools seen before, checked: (tensor identities and geometry, layout) -> the view the kernel reads. A layer's pool
# is the same tensors on every call, so the layout check runs once per pool, not once per step.
_POOL_VIEWS: dict[tuple, _PoolView] = {}
_IO_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_ERRORS = {
    -1: "kv_indptr and qo_indptr must be non-negative and non-decreasing",
    -2: "kv_indptr overruns kv_indices",
    -4: "qo_indptr must end at the query rows, and every request needs at least as many kv slots as new tokens "
    "(the new tokens are written before they are attended)",
}


def _checked_view(name: str, pool: PackedVectors, quantizer: TurboQuantizer) -> _PoolView:
    codes, norms = pool.codes, pool.norms
    key = (
        codes.data_ptr(), codes.shape, codes.stride(), codes.dtype,
        norms.data_ptr(), norms.shape, norms.stride(), norms.dtype, quantizer.layout,
    )  # fmt: skip
    view = _POOL_VIEWS.get(key)
    if view is None:
        check_pool(name, pool, quantizer.layout)
        if codes.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {codes.device}")
        if len(_POOL_VIEWS) > 4096:  # pools come and go in tests; a server has one per layer
            _POOL_VIEWS.clear()
        view = _POOL_VIEWS[key] = _PoolView(
            codes=codes.data_ptr(),
            code_slot_stride=codes.stride(0),
            code_head_stride=codes.stride(1),
            norms=norms.data_ptr(),
            norm_slot_stride=norms.stride(0),
            norm_head_stride=norms.stride(1),
        )
    return view


def _index(name: str, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """An index tensor as the kernel reads it (int32 or int64, contiguous) and whether it is int64."""
    if index.dtype not in (torch.int32, torch.int64):
        index = index.long()
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    index = index.contiguous()
    return index, int(index.dtype == torch.int64)


def _io(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """q as the kernel reads it (bfloat16 or float32, head_dim contiguous) and whether it is bfloat16."""
    if q.dtype not in _IO_DTYPES:
        q = q.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    return q, _IO_DTYPES[q.dtype]


def _parallel(num_threads: int | None) -> tuple[int, int]:
    """(threads, least work for more than one): the caller's count for any work, else torch's above
    PARALLEL_MIN_KEYS (key, KV head) pairs."""
    if num_threads is not None:
        return max(1, num_threads), 0
    return torch.get_num_threads(), PARALLEL_MIN_KEYS


def _raise_for(code: int, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_slots: int) -> None:
    if code == -3:
        check_slots("kv_indices", kv_indices[: int(kv_indptr[-1])], num_slots)
    raise ValueError(f"{_ERRORS.get(code, f'CPU attention kernel error {code}')} (kv_indptr {kv_indptr.tolist()})")


def _check_q(q: torch.Tensor, k_quantizer: TurboQuantizer, kv_heads: int) -> None:
    if q.dim() != 3 or q.shape[-1] != k_quantizer.layout.head_dim:
        raise ValueError(f"q must be (rows, q_heads, {k_quantizer.layout.head_dim}), got {tuple(q.shape)}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of the pool's KV heads ({kv_heads})")
    if q.device.type != "cpu":
        raise ValueError(f"q must be on the CPU, got {q.device}")


def decode_attention(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    *,
    sliding_window_size: int | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """One new token per request: q (B, Hq, d) -> (B, Hq, d) in q.dtype, as reference.decode_attention (with a
    window, each request reads its last W + 1 slots).

    num_threads: OpenMP threads (default: torch's, or 1 for a small step); the output does not depend on it."""
    lib = load_library()
    if lib is None or q.device.type != "cpu":
        return torch_batched.decode_attention(
            q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale, logit_cap,
            sliding_window_size=sliding_window_size,
        )  # fmt: skip
    window = window_of(sliding_window_size)
    kp, vp = _checked_view("k_pool", k_pool, k_quantizer), _checked_view("v_pool", v_pool, v_quantizer)
    hkv = k_pool.codes.shape[1]
    _check_q(q, k_quantizer, hkv)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    simd = bool(lib.tq_has_avx2())
    kl, vl = kernel_layout(k_quantizer, simd), kernel_layout(v_quantizer, simd)
    x, io_bf16 = _io(q)
    indptr, indptr_64 = _index("kv_indptr", kv_indptr)
    index, index_64 = _index("kv_indices", kv_indices)
    threads, min_work = _parallel(num_threads)
    batch, hq, d = q.shape
    out = torch.empty(batch, hq, d, dtype=x.dtype)
    code = lib.tq_decode(
        x.data_ptr(), io_bf16, x.stride(0), x.stride(1),
        ctypes.byref(kl.spec), kp, kl.basis_t.data_ptr(), ctypes.byref(vl.spec), vp, vl.basis.data_ptr(),
        k_pool.codes.shape[0], indptr.data_ptr(), indptr_64, index.data_ptr(), index_64, index.numel(),
        batch, hkv, hq // hkv, sm_scale, logit_cap, -1 if window is None else window,
        out.data_ptr(), threads, min_work,
    )  # fmt: skip
    if code:
        _raise_for(code, kv_indptr, kv_indices, k_pool.codes.shape[0])
    return out if out.dtype == q.dtype else out.to(q.dtype)


def extend_attention(
    q: torch.Tensor,
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    sm_scale: float,
    logit_cap: float = 0.0,
    max_new_tokens: int | None = None,
    *,
    sliding_window_size: int | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """New tokens of each request, causal over prefix + themselves (and within a window, if any): q (T, Hq, d) ->
    (T, Hq, d) in q.dtype, as reference.extend_attention (max_new_tokens, the Triton kernel's grid hint, is not
    needed here)."""
    lib = load_library()
    if lib is None or q.device.type != "cpu":
        return torch_batched.extend_attention(
            q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale, logit_cap,
            sliding_window_size=sliding_window_size,
        )  # fmt: skip
    window = window_of(sliding_window_size)
    kp, vp = _checked_view("k_pool", k_pool, k_quantizer), _checked_view("v_pool", v_pool, v_quantizer)
    hkv = k_pool.codes.shape[1]
    _check_q(q, k_quantizer, hkv)
    if qo_indptr.numel() != kv_indptr.numel():
        raise ValueError(f"qo_indptr ({qo_indptr.numel()} entries) must match kv_indptr ({kv_indptr.numel()})")
    simd = bool(lib.tq_has_avx2())
    kl, vl = kernel_layout(k_quantizer, simd), kernel_layout(v_quantizer, simd)
    x, io_bf16 = _io(q)
    qo, qo_64 = _index("qo_indptr", qo_indptr)
    indptr, indptr_64 = _index("kv_indptr", kv_indptr)
    index, index_64 = _index("kv_indices", kv_indices)
    threads, min_work = _parallel(num_threads)
    tokens, hq, d = q.shape
    out = torch.empty(tokens, hq, d, dtype=x.dtype)
    code = lib.tq_extend(
        x.data_ptr(), io_bf16, x.stride(0), x.stride(1), tokens,
        ctypes.byref(kl.spec), kp, kl.basis_t.data_ptr(), ctypes.byref(vl.spec), vp, vl.basis.data_ptr(),
        k_pool.codes.shape[0], qo.data_ptr(), qo_64, indptr.data_ptr(), indptr_64, index.data_ptr(), index_64,
        index.numel(), qo.numel() - 1, hkv, hq // hkv, sm_scale, logit_cap, -1 if window is None else window,
        out.data_ptr(), threads, min_work,
    )  # fmt: skip
    if code == -4:
        _extend_bounds(q, qo_indptr, kv_indptr)  # raises, naming the request
    if code:
        _raise_for(code, kv_indptr, kv_indices, k_pool.codes.shape[0])
    return out if out.dtype == q.dtype else out.to(q.dtype)


def write_kv(
    k_pool: PackedVectors,
    v_pool: PackedVectors,
    k: torch.Tensor,
    v: torch.Tensor,
    out_cache_loc: torch.Tensor,
    k_quantizer: TurboQuantizer,
    v_quantizer: TurboQuantizer,
    *,
    saturated: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> None:
    """Quantize k, v (T, Hkv, d) into pool slots out_cache_loc (T,), in place, as reference.write_kv: each vector
    on its own in a fixed order (csrc/cpu_attention.cpp), within kernels/write_budget.py of the reference's codes.
    `saturated` (int64, one element) counts the norms stored saturated. Nothing is written if a slot is out of range.
    """
    lib = load_library()
    if lib is None or k.device.type != "cpu":
        return reference.write_kv(k_pool, v_pool, k, v, out_cache_loc, k_quantizer, v_quantizer, saturated=saturated)
    kp, vp = _checked_view("k_pool", k_pool, k_quantizer), _checked_view("v_pool", v_pool, v_quantizer)
    hkv = k_pool.codes.shape[1]
    tokens = out_cache_loc.numel()
    if k_quantizer.layout.head_dim != v_quantizer.layout.head_dim:
        raise ValueError(f"K and V quantizers disagree on head_dim: {k_quantizer.layout} vs {v_quantizer.layout}")
    check_kv_vectors(k, v, hkv, k_quantizer.layout.head_dim, tokens)
    loc, loc_64 = _index("out_cache_loc", out_cache_loc)
    counter = saturated
    if saturated is not None and (saturated.dtype != torch.int64 or saturated.device.type != "cpu"):
        counter = torch.zeros(1, dtype=torch.int64)
    # Each vector costs a d x d rotation (about 2 us at d = 128): a parallel region pays from a few dozen on.
    threads = num_threads or (torch.get_num_threads() if tokens * hkv >= 32 else 1)
    num_slots = k_pool.codes.shape[0]
    for pool, x, qz in ((kp, k, k_quantizer), (vp, v, v_quantizer)):
        x, is_bf16 = _io(x)
        code = lib.tq_write_vectors(
            ctypes.byref(encode_layout(qz).spec), pool, num_slots, x.data_ptr(), is_bf16, x.stride(0), x.stride(1),
            tokens, hkv, loc.data_ptr(), loc_64, None if counter is None else counter.data_ptr(), threads,
        )  # fmt: skip
        if code:
            check_slots("out_cache_loc", loc, num_slots)
            raise IndexError(f"out_cache_loc holds a slot outside the pool of {num_slots} slots")
    if counter is not None and counter is not saturated:
        saturated += counter.to(saturated.device)
