"""Time every candidate launch config of a kernel at a representative shape and keep the fastest correct one.

Shapes are fixed per kernel and independent of sequence length in the key (the kernels split long contexts).
Timing uses triton.testing.do_bench on CUDA. The Triton interpreter cannot use that timer, so on CPU a wall-clock
median stands in; those numbers only exercise the machinery. A candidate that fails to compile or run (out of shared
memory, registers) is skipped. The winner must also reproduce the torch reference on the same packed data,
otherwise the next fastest is taken.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels import reference
from ..kernels.layout import VectorLayout
from ..kernels.quantizer import get_quantizer
from .provenance import git_commit
from .spaces import candidates, default_config
from .store import CONFIG_DIR, TuningKey, save

SHAPES = {
    # (batch, context per request, kv heads) for decode/extend; tokens for write.
    "gpu": {"batch": 32, "context": 8192, "kv_heads": 8, "extend_tokens": 512, "write_tokens": 8192},
    "tiny": {"batch": 2, "context": 40, "kv_heads": 2, "extend_tokens": 8, "write_tokens": 24},
}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu-interpreter"


def cpu_do_bench(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time in ms after one warm-up call (the interpreter has no CUDA events)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def default_timer() -> Callable[[Callable[[], object]], float]:
    if torch.cuda.is_available():
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)
    return cpu_do_bench


@dataclass
class Case:
    """A kernel call at a fixed shape: run(config) launches it, check(config) compares it with the reference."""

    run: Callable[[dict], object]
    reference: torch.Tensor

    def check(self, config: dict) -> bool:
        out = self.run(config)
        return bool(torch.allclose(out.float(), self.reference.float(), rtol=1e-3, atol=1e-3))


def make_case(key: TuningKey, size: str, device: torch.device) -> Case:
    shape = SHAPES[size]
    gen = torch.Generator(device="cpu").manual_seed(0)
    kq = get_quantizer(VectorLayout(head_dim=key.head_dim, bits=key.k_bits, variant=key.variant))
    vq = get_quantizer(VectorLayout(head_dim=key.head_dim, bits=key.v_bits, variant=key.variant))
    hkv, d = shape["kv_heads"], key.head_dim
    batch, context = shape["batch"], shape["context"]
    slots = batch * context

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen).to(device=device, dtype=torch.bfloat16)

    k_pool = torch.zeros(slots, hkv, kq.layout.bytes_per_vector, dtype=torch.uint8, device=device)
    v_pool = torch.zeros(slots, hkv, vq.layout.bytes_per_vector, dtype=torch.uint8, device=device)
    if key.kernel == "write":
        from ..kernels.triton_write import write_kv_triton

        n = shape["write_tokens"]
        k, v = randn(n, hkv, d), randn(n, hkv, d)
        loc = torch.randperm(slots, generator=gen)[:n].to(device)
        reference.write_kv(k_pool, v_pool, k, v, loc, kq, vq)
        expected = torch.cat([k_pool[loc], v_pool[loc]], dim=-1).clone()

        def run_write(config: dict) -> torch.Tensor:
            write_kv_triton(k_pool, v_pool, k, v, loc, kq, vq, **config)
            return torch.cat([k_pool[loc], v_pool[loc]], dim=-1)

        # Bytes equal except where a coordinate sits on a codebook boundary: compare the dequantized vectors instead.
        def unpack(records: torch.Tensor) -> torch.Tensor:
            kb = kq.layout.bytes_per_vector
            return torch.cat([kq.dequantize(records[..., :kb]), vq.dequantize(records[..., kb:])], dim=-1)

        return Case(run=lambda config: unpack(run_write(config)), reference=unpack(expected))

    reference.write_kv(
        k_pool, v_pool, randn(slots, hkv, d), randn(slots, hkv, d), torch.arange(slots, device=device), kq, vq
    )
    kv_indptr = torch.arange(0, slots + 1, context, device=device, dtype=torch.int32)
    kv_indices = torch.randperm(slots, generator=gen).to(device=device, dtype=torch.int32)
    sm_scale = d**-0.5
    if key.kernel == "decode":
        from ..kernels.triton_decode import decode_attention_triton

        q = randn(batch, hkv * key.group, d)
        args = (q, k_pool, v_pool, kv_indptr, kv_indices, kq, vq, sm_scale)
        return Case(
            run=lambda config: decode_attention_triton(*args, **config),
            reference=reference.decode_attention(*args),
        )
    if key.kernel == "extend":
        from ..kernels.triton_extend import extend_attention_triton

        new = shape["extend_tokens"]
        qo_indptr = torch.arange(0, batch * new + 1, new, device=device, dtype=torch.int32)
        q = randn(batch * new, hkv * key.group, d)
        args = (q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, kq, vq, sm_scale)
        return Case(
            run=lambda config: extend_attention_triton(*args, **config),
            reference=reference.extend_attention(*args),
        )
    raise ValueError(f"unknown kernel {key.kernel!r}")


def tune(
    key: TuningKey,
    *,
    space: dict | None = None,
    size: str = "gpu",
    timer: Callable[[Callable[[], object]], float] | None = None,
    config_dir: Path = CONFIG_DIR,
    progress: Callable[[str], None] = print,
) -> Path:
    """Tune one key, write its JSON file and return the path."""
    timer = timer or default_timer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = make_case(key, size, device)
    configs = candidates(key.kernel, key.head_dim, space, key.variant)
    timed, skipped = [], 0
    for i, config in enumerate(configs, 1):
        try:
            ms = timer(lambda config=config: case.run(config))
        except Exception as err:  # compile errors and out-of-resources differ by Triton version
            skipped += 1
            progress(f"[{key.kernel} {i}/{len(configs)}] skipped {config}: {type(err).__name__}")
            continue
        timed.append((ms, config))
        progress(f"[{key.kernel} {i}/{len(configs)}] {ms * 1e3:9.1f} us  {config}")
    default = default_config(key.kernel, key.head_dim)
    ranked = sorted(timed, key=lambda t: t[0])
    best_ms, winner = next(((ms, c) for ms, c in ranked if case.check(c)), (None, None))
    if winner is None:
        raise RuntimeError(f"no candidate of {key.kernel} ran and matched the reference ({skipped} failed)")
    timings = {"best": 1e3 * best_ms}
    try:
        timings["default"] = 1e3 * timer(lambda: case.run(default))
    except Exception:  # the default may not fit this GPU: then there is nothing to compare
        timings["default"] = None
    stamp = {
        "gpu": key.gpu,
        "triton": key.triton,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "shape": SHAPES[size],
        "candidates": len(configs),
        "skipped": skipped,
    }
    return save(key, winner, timings=timings, stamp=stamp, config_dir=config_dir)
