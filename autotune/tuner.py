"""Time every candidate launch config of a kernel at a representative shape and keep the fastest correct one.

Shapes are fixed per kernel and independent of sequence length in the key (the kernels split long contexts).
Timing uses triton.testing.do_bench on CUDA, with the launchers' index checks off (as serving calls them: those
checks sync the device). The Triton interpreter cannot use that timer, so on CPU a wall-clock median stands in;
those numbers only exercise the machinery. A candidate that fails to compile or run (out of shared memory,
registers) is skipped. The winner must also pass the same checks as the kernel tests and the GPU check, on the same
packed data as the torch reference: for the write, codes equal except a few flipped by one level where a coordinate
sits on a codebook boundary (write_budget.write_mismatch: summation order legitimately moves those); for attention,
outputs within the tolerance of the dot precision the config chose (triton_common.attention_mismatch). Otherwise the
next fastest is taken. The chosen config, dot precision included, is what the file stores.
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
from ..kernels.packed import PackedVectors
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
    """A kernel call at a fixed shape: run(config) launches it (no index checks), mismatch(config) compares one run
    with the reference and says what differs (None when it passes)."""

    run: Callable[[dict], object]
    mismatch: Callable[[dict], str | None]


def make_case(key: TuningKey, size: str, device: torch.device) -> Case:
    from ..kernels.triton_common import attention_mismatch

    shape = SHAPES[size]
    gen = torch.Generator(device=device).manual_seed(0)
    kq = get_quantizer(VectorLayout(head_dim=key.head_dim, bits=key.k_bits, variant=key.variant))
    vq = get_quantizer(VectorLayout(head_dim=key.head_dim, bits=key.v_bits, variant=key.variant))
    hkv, d = shape["kv_heads"], key.head_dim
    batch, context = shape["batch"], shape["context"]
    slots = batch * context

    def randn(*dims: int) -> torch.Tensor:
        return torch.randn(*dims, generator=gen, device=device).to(torch.bfloat16)

    k_pool = PackedVectors.empty(kq.layout, (slots, hkv), device)
    v_pool = PackedVectors.empty(vq.layout, (slots, hkv), device)
    if key.kernel == "write":
        from ..kernels.triton_write import write_kv_triton
        from ..kernels.write_budget import write_mismatch

        n = shape["write_tokens"]
        k, v = randn(n, hkv, d), randn(n, hkv, d)
        loc = torch.randperm(slots, generator=gen, device=device)[:n]
        reference.write_kv(k_pool, v_pool, k, v, loc, kq, vq)
        want_k, want_v = k_pool.index_select(loc), v_pool.index_select(loc)

        def run_write(config: dict) -> None:
            write_kv_triton(k_pool, v_pool, k, v, loc, kq, vq, check_indices=False, **config)

        def write_problem(config: dict) -> str | None:
            run_write(config)
            return write_mismatch(k_pool.index_select(loc), want_k, kq) or write_mismatch(
                v_pool.index_select(loc), want_v, vq
            )

        return Case(run=run_write, mismatch=write_problem)

    loc = torch.arange(slots, device=device)
    reference.write_kv(k_pool, v_pool, randn(slots, hkv, d), randn(slots, hkv, d), loc, kq, vq)
    kv_indptr = torch.arange(0, slots + 1, context, device=device, dtype=torch.int32)
    kv_indices = torch.randperm(slots, generator=gen, device=device).to(torch.int32)
    sm_scale = d**-0.5
    if key.kernel == "decode":
        from ..kernels.triton_decode import decode_attention_triton as kernel

        q = randn(batch, hkv * key.group, d)
        args = (q, k_pool, v_pool, kv_indptr, kv_indices, kq, vq, sm_scale)
        expected = reference.decode_attention(*args)
    elif key.kernel == "extend":
        from ..kernels.triton_extend import extend_attention_triton as kernel

        new = shape["extend_tokens"]
        qo_indptr = torch.arange(0, batch * new + 1, new, device=device, dtype=torch.int32)
        q = randn(batch * new, hkv * key.group, d)
        args = (q, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, kq, vq, sm_scale)
        expected = reference.extend_attention(*args)
    else:
        raise ValueError(f"unknown kernel {key.kernel!r}")
    return Case(
        run=lambda config: kernel(*args, check_indices=False, **config),
        mismatch=lambda config: attention_mismatch(
            kernel(*args, **config), expected, config.get("dot_precision", "bf16")
        ),
    )


def tune(
    key: TuningKey,
    *,
    space: dict | None = None,
    size: str = "gpu",
    timer: Callable[[Callable[[], object]], float] | None = None,
    config_dir: Path = CONFIG_DIR,
    deadline: float = float("inf"),
    progress: Callable[[str], None] = print,
) -> Path:
    """Tune one key, write its JSON file and return the path. Candidates past `deadline` (time.monotonic) are not
    timed; raises RuntimeError when none ran and passed its check."""
    timer = timer or default_timer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = make_case(key, size, device)
    default = default_config(key.kernel, key.head_dim)
    configs = candidates(key.kernel, key.head_dim, space, key.variant)
    # The rule's own config first: under a deadline it is the one worth timing.
    configs.sort(key=lambda c: c != {**c, **{k: v for k, v in default.items() if k in c}})
    timed, skipped, rejected = [], 0, []
    for i, config in enumerate(configs, 1):
        if time.monotonic() > deadline:
            progress(f"[{key.kernel} {i}/{len(configs)}] time box reached: {len(configs) - i + 1} not timed")
            break
        try:
            ms = timer(lambda config=config: case.run(config))
        except Exception as err:  # compile errors and out-of-resources differ by Triton version
            skipped += 1
            progress(f"[{key.kernel} {i}/{len(configs)}] skipped {config}: {type(err).__name__}")
            continue
        timed.append((ms, config))
        progress(f"[{key.kernel} {i}/{len(configs)}] {ms * 1e3:9.1f} us  {config}")
    winner, best_ms = None, None
    for ms, config in sorted(timed, key=lambda t: t[0]):
        problem = case.mismatch(config)
        if problem is None:
            winner, best_ms = config, ms
            break
        rejected.append({"config": config, "problem": problem})
        progress(f"[{key.kernel}] rejected {config}: {problem}")
    if winner is None:
        raise RuntimeError(
            f"no candidate of {key.kernel} ran and matched the reference ({skipped} failed to run, "
            f"{len(rejected)} mismatched{': ' + rejected[0]['problem'] if rejected else ''})"
        )
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
        "timed": len(timed),
        "skipped": skipped,
        "rejected": rejected,
    }
    return save(key, winner, timings=timings, stamp=stamp, config_dir=config_dir)


def tune_keys(
    keys: list[TuningKey],
    *,
    spaces: dict[str, dict] | None = None,
    size: str = "gpu",
    config_dir: Path = CONFIG_DIR,
    deadline: float = float("inf"),
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Tune each key in turn; a key that fails (nothing compiles, nothing matches) is reported and the rest go on.
    Returns one {key, path | error} per key."""
    results = []
    for i, key in enumerate(keys, 1):
        name = f"{key.kernel}/{key.filename}"
        if time.monotonic() > deadline:
            results.append({"key": name, "error": "time box reached before this key"})
            continue
        progress(f"== {i}/{len(keys)} {name}")
        try:
            path = tune(
                key,
                space=None if spaces is None else spaces[key.kernel],
                size=size,
                config_dir=config_dir,
                deadline=deadline,
                progress=progress,
            )
        except Exception as err:  # one bad key must not cost the others their tuning run
            results.append({"key": name, "error": f"{type(err).__name__}: {err}"})
            progress(f"   FAILED {name}: {type(err).__name__}: {err}")
            continue
        results.append({"key": name, "path": str(path)})
        progress(f"   wrote {path}")
    return results
