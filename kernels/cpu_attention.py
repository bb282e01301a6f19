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

from . import torch_batched
from .packed import PackedVectors
from .quantizer import TurboQuantizer
from .reference import _check_attention_args, _extend_bounds, window_of

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_attention.cpp"
# -ffp-contract=fast is GCC's default, spelled out: a multiply-add is fused the same way wherever it is compiled.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC")
ABI_VERSION = 2
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
    common = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(_VectorSpec), _PoolView]
    common += [ctypes.POINTER(_VectorSpec), _PoolView]
    tail = [ctypes.c_int32] * 4 + [ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    lib.tq_decode_attention.argtypes = [*common, ctypes.c_void_p, ctypes.c_void_p, *tail]
    lib.tq_extend_attention.argtypes = [*common, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *tail]
    lib.tq_matmul_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32]
    lib.tq_matmul_rows.argtypes += [ctypes.c_void_p, ctypes.c_int32]
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
        out = torch.zeros(16)
        out[: codebook.numel()] = codebook.float()
        return out

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


# ------------------------------------------------------------------------------------------------------------- ops


def _pool_view(pool: PackedVectors) -> _PoolView:
    codes, norms = pool.codes, pool.norms
    if codes.stride(-1) != 1 or (norms.numel() and norms.stride(-1) != 1):
        raise ValueError("pool codes and norms must be contiguous in their last dimension")
    return _PoolView(
        codes=codes.data_ptr(),
        code_slot_stride=codes.stride(0),
        code_head_stride=codes.stride(1),
        norms=norms.data_ptr(),
        norm_slot_stride=norms.stride(0),
        norm_head_stride=norms.stride(1),
    )


def _matmul_rows(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    """x (..., k) @ w (k, n) by the kernel's fixed-order row products -> (..., n) float32."""
    x = x.float().contiguous()
    out = torch.empty(*x.shape[:-1], w.shape[1], dtype=torch.float32)
    rows = x.numel() // max(x.shape[-1], 1)
    lib.tq_matmul_rows(x.data_ptr(), rows, w.shape[0], w.data_ptr(), w.shape[1], out.data_ptr(), threads)
    return out


def _indices(kv_indices: torch.Tensor) -> tuple[torch.Tensor, int]:
    if kv_indices.dtype in (torch.int32, torch.int64):
        index = kv_indices.contiguous()
    else:
        index = kv_indices.long().contiguous()
    return index, int(index.dtype == torch.int64)


def _threads(num_threads: int | None, work: int) -> int:
    if num_threads is not None:
        return max(1, num_threads)
    return torch.get_num_threads() if work >= PARALLEL_MIN_KEYS else 1


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
    window, each request reads its last W + 1 slots only).

    num_threads: OpenMP threads (default: torch's, or 1 for a small step); the output does not depend on it."""
    lib = load_library()
    if lib is None or q.device.type != "cpu":
        return torch_batched.decode_attention(
            q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer, sm_scale, logit_cap,
            sliding_window_size=sliding_window_size,
        )  # fmt: skip
    window = window_of(sliding_window_size)
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    if kv_indptr.numel() != q.shape[0] + 1:
        raise ValueError(f"kv_indptr must have batch + 1 = {q.shape[0] + 1} entries, got {kv_indptr.numel()}")
    simd = bool(lib.tq_has_avx2())
    kl, vl = kernel_layout(k_quantizer, simd), kernel_layout(v_quantizer, simd)
    batch, hq, _ = q.shape
    hkv = k_pool.shape[1]
    indptr = kv_indptr.to(torch.int64).contiguous()
    index, index_64 = _indices(kv_indices)
    keys = int(indptr[-1]) if window is None else min(int(indptr[-1]), batch * (window + 1))
    threads = _threads(num_threads, keys * hkv)
    qs = _matmul_rows(lib, q, kl.basis_t, 1)  # (B, Hq, E_k): a few rows, not worth a parallel region
    acc = torch.empty(batch, hq, vl.basis.shape[0], dtype=torch.float32)
    lib.tq_decode_attention(
        qs.data_ptr(),
        qs.stride(0),
        qs.stride(1),
        ctypes.byref(kl.spec),
        _pool_view(k_pool),
        ctypes.byref(vl.spec),
        _pool_view(v_pool),
        indptr.data_ptr(),
        index.data_ptr(),
        index_64,
        batch,
        hkv,
        hq // hkv,
        sm_scale,
        logit_cap,
        -1 if window is None else window,
        acc.data_ptr(),
        threads,
    )
    return _matmul_rows(lib, acc, vl.basis, 1).to(q.dtype)


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
    _check_attention_args(q, k_pool, v_pool, kv_indptr, kv_indices, k_quantizer, v_quantizer)
    _extend_bounds(q, qo_indptr, kv_indptr)
    simd = bool(lib.tq_has_avx2())
    kl, vl = kernel_layout(k_quantizer, simd), kernel_layout(v_quantizer, simd)
    tokens, hq, _ = q.shape
    hkv = k_pool.shape[1]
    qo = qo_indptr.to(torch.int64).contiguous()
    indptr = kv_indptr.to(torch.int64).contiguous()
    index, index_64 = _indices(kv_indices)
    threads = _threads(num_threads, int(indptr[-1]) * hkv * max(tokens, 1))
    qs = _matmul_rows(lib, q, kl.basis_t, threads)
    acc = torch.zeros(tokens, hq, vl.basis.shape[0], dtype=torch.float32)
    lib.tq_extend_attention(
        qs.data_ptr(),
        qs.stride(0),
        qs.stride(1),
        ctypes.byref(kl.spec),
        _pool_view(k_pool),
        ctypes.byref(vl.spec),
        _pool_view(v_pool),
        qo.data_ptr(),
        indptr.data_ptr(),
        index.data_ptr(),
        index_64,
        qo.numel() - 1,
        hkv,
        hq // hkv,
        sm_scale,
        logit_cap,
        -1 if window is None else window,
        acc.data_ptr(),
        threads,
    )
    return _matmul_rows(lib, acc, vl.basis, threads).to(q.dtype)
