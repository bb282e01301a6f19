"""Every GPU figure in one run of at most ~8 minutes: `python -m tq_serve.bench gpu [--out DIR] [--dry-run]`.

Needs torch, Triton and numpy only (no SGLang, pydantic, yaml or network): on a bare CUDA box, from a checkout,
`PYTHONPATH=. python -m tq_serve.bench gpu` (or `make gpu-check`). All data is generated on the device. Stages run
in this order, each with its own time box, and each is appended to DIR/gpu_check.json the moment it ends (the file
is valid JSON after every stage, so a run cut short still leaves every finished figure):

    environment   GPU, versions, commit; device-to-device copy bandwidth (the ceiling for memory-bound kernels)
    correctness   write / decode / extend on CUDA against the torch reference on the same data: the write within
                  a code-flip budget (a code may move one level where a coordinate sits on a boundary), attention
                  with the exact-float32 dots tightly and with the default bf16 dots within bf16 accuracy. The
                  first failing case stops the run (named in the JSON); no timing runs on wrong kernels
    decode        batch x context (32 x 32k first, then 1/8/128 and 8k/128k as time allows), bits 4/3/2, against
                  bf16 SDPA (flash, efficient, cudnn), SDPA over slots gathered from a paged bf16 cache and
                  flex_attention; eager and from a CUDA graph; GB/s of the bytes each must read, and the fraction of
                  the copy bandwidth
    extend        prefill / cached-prefix extend against causal bf16 SDPA
    write         quantize + scatter K and V: bytes/s against the copy bandwidth, and against a bf16 index_put
    autotune      decode and write at (d 128, GQA 4, bits 4/3/2), a small space: stamped configs under
                  DIR/configs/kernels/, ready to copy into configs/kernels/
    step          a whole decode step at Llama-3.1-8B shapes (32 layers, 32 q heads, 8 KV heads, d 128, random
                  weights) under a CUDA graph, TurboQuant against bf16 SDPA

`--dry-run` runs every stage at tiny sizes on the CPU under the Triton interpreter (the CPU test suite does, with
SGLang, pydantic and yaml hidden): it proves the code, not the speed, and its timings are flagged meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tq_serve.autotune.provenance import git_commit

from .static_budget import REPO_ROOT


@dataclass(frozen=True)
class ModelShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    layers: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


LLAMA_8B = ModelShape(q_heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, layers=32)
TINY = ModelShape(q_heads=8, kv_heads=2, head_dim=64, hidden=128, intermediate=256, layers=2)


@dataclass(frozen=True)
class Plan:
    """Sizes and time boxes (seconds) of one run; FULL on a GPU, DRY on a CPU under the interpreter."""

    shape: ModelShape
    copy_bytes: int
    decode_shapes: tuple[tuple[int, int], ...]  # (batch, context), most important first
    bits: tuple[float, ...]
    extend_cases: tuple[tuple[int, int, int], ...]  # (requests, cached prefix, new tokens)
    write_tokens: tuple[int, ...]
    step: tuple[int, int]  # (batch, context)
    correctness_contexts: tuple[int, ...]
    correctness_layouts: tuple[tuple[int, float, float, str], ...]  # (head_dim, k_bits, v_bits, variant)
    autotune_bits: tuple[float, ...]
    time_box: dict[str, float] = field(default_factory=dict)


FULL = Plan(
    shape=LLAMA_8B,
    copy_bytes=1 << 30,
    decode_shapes=((32, 32768), (1, 32768), (8, 32768), (128, 8192), (32, 8192), (32, 131072), (128, 32768)),
    bits=(4, 3, 2),
    extend_cases=((1, 0, 8192), (4, 4096, 1024)),
    write_tokens=(8192, 32),
    step=(32, 8192),
    correctness_contexts=(1, 17, 1025, 5000),
    correctness_layouts=(
        # the headline layouts first, then each other part kind (QJL signs, two segments, a padded head_dim, raw V):
        # every layout costs a few kernel compiles, and the time box stops starting new ones
        (128, 4, 4, "mse"),
        (128, 3, 3, "mse"),
        (128, 2, 2, "mse"),
        (128, 4, 4, "prod"),
        (128, 3.5, 2.5, "mse"),
        (96, 3, 16, "mse"),
    ),
    autotune_bits=(4, 3, 2),
    time_box={"correctness": 60, "decode": 170, "extend": 40, "write": 30, "autotune": 100, "step": 60},
)
DRY = Plan(
    shape=TINY,
    copy_bytes=1 << 20,
    decode_shapes=((2, 17), (1, 9)),
    bits=(4, 3, 2),
    extend_cases=((2, 5, 4), (1, 3, 12)),  # one row block per request, then several (the unpack-once path)
    write_tokens=(5,),
    step=(2, 9),
    correctness_contexts=(1, 17),
    correctness_layouts=((64, 4, 4, "mse"), (64, 3.5, 2.5, "mse"), (64, 3, 16, "prod")),
    autotune_bits=(4,),
    time_box={"correctness": 600, "decode": 600, "extend": 600, "write": 600, "autotune": 600, "step": 600},
)


# ------------------------------------------------------------------------------------------------ timing, environment


class Clock:
    """Milliseconds per call: do_bench's median on CUDA (L2 flushed between runs); on a CPU one wall-clock call."""

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def environment(device) -> dict:
    import torch
    import triton

    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.machine()})",
        "sms": props.multi_processor_count if props else None,
        "memory_GiB": props.total_memory / 2**30 if props else None,
        "capability": f"{props.major}.{props.minor}" if props else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def gpu_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def copy_bandwidth(device, clock: Clock, nbytes: int) -> float:
    """Device-to-device copy, read + write bytes per second: the ceiling a memory-bound kernel is held against."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (clock(lambda: dst.copy_(src)) * 1e-3)


def graphed(fn: Callable[[], object], device) -> Callable[[], object] | None:
    """fn replayed from a CUDA graph (how SGLang runs decode); None on a CPU."""
    import torch

    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile the Triton kernels and settle allocations before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def fits(device, nbytes: int) -> bool:
    """Whether nbytes more fit in device memory with headroom (always on a CPU: dry-run sizes are tiny)."""
    import torch

    if device.type != "cuda":
        return True
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.85 * free


# ---------------------------------------------------------------------------------------------------------- the data


def quantizer(head_dim: int, bits: float, variant: str = "mse"):
    from tq_serve.kernels.layout import VectorLayout
    from tq_serve.kernels.quantizer import get_quantizer

    return get_quantizer(VectorLayout(head_dim=head_dim, bits=bits, variant=variant))


def random_pool(layout, slots: int, kv_heads: int, device, gen):
    """Random code rows and norms in [0.5, 1.5), made on the device (a real pool holds any byte values)."""
    import torch

    from tq_serve.kernels.packed import PackedVectors

    codes = torch.randint(0, 256, (slots, kv_heads, layout.code_bytes), dtype=torch.uint8, device=device, generator=gen)
    norms = torch.rand(slots, kv_heads, layout.norms_per_vector, device=device, generator=gen) + 0.5
    return PackedVectors(codes, norms.to(getattr(torch, layout.norm_dtype)))


def pool_bytes(layout, tokens: int, kv_heads: int) -> int:
    return tokens * kv_heads * layout.bytes_per_vector


# ------------------------------------------------------------------------------------------------------- the stages


class StageFailed(RuntimeError):
    """A correctness failure: the run stops after recording it."""


@dataclass
class Context:
    plan: Plan
    device: object
    clock: Clock
    out: Path
    copy_bw: float = 0.0
    deadline: float = math.inf

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def generator(self, seed: int):
        import torch

        return torch.Generator(device=self.device).manual_seed(seed)


def stage_environment(ctx: Context) -> dict:
    env = environment(ctx.device)
    ctx.copy_bw = copy_bandwidth(ctx.device, ctx.clock, ctx.plan.copy_bytes)
    return {**env, "copy_GBps": ctx.copy_bw / 1e9, "copy_bytes": ctx.plan.copy_bytes}


# Exact float32 dots first (a wrong index shows at 1e-3), then the serving default.
PRECISIONS = ("ieee", "bf16")


def stage_correctness(ctx: Context) -> dict:
    import torch

    from tq_serve.kernels import reference
    from tq_serve.kernels.packed import PackedVectors
    from tq_serve.kernels.triton_common import attention_mismatch
    from tq_serve.kernels.triton_decode import decode_attention_triton
    from tq_serve.kernels.triton_extend import extend_attention_triton
    from tq_serve.kernels.triton_write import write_kv_triton
    from tq_serve.kernels.write_budget import write_mismatch

    dev, gen = ctx.device, ctx.generator(1)
    heads, group = ctx.plan.shape.kv_heads, ctx.plan.shape.group
    cases = []

    def record(name: str, ok: bool, **detail) -> None:
        cases.append({"case": name, "passed": ok, **detail})
        if not ok:
            raise StageFailed(f"{name}: {detail}")

    for d, kb, vb, variant in ctx.plan.correctness_layouts:
        if ctx.time_left() < 0:
            cases.append({"case": f"d{d}-k{kb}-v{vb}-{variant}", "skipped": "time box"})
            continue
        kq, vq = quantizer(d, kb, variant), quantizer(d, vb, variant)
        contexts = ctx.plan.correctness_contexts
        slots = sum(contexts) + 64
        k = torch.randn(slots, heads, d, device=dev, generator=gen).to(torch.bfloat16)
        v = torch.randn(slots, heads, d, device=dev, generator=gen).to(torch.bfloat16)
        loc = torch.randperm(slots, device=dev, generator=gen)
        want_k, want_v = (
            PackedVectors.empty(kq.layout, (slots, heads), dev),
            PackedVectors.empty(vq.layout, (slots, heads), dev),
        )
        got_k, got_v = (
            PackedVectors.empty(kq.layout, (slots, heads), dev),
            PackedVectors.empty(vq.layout, (slots, heads), dev),
        )
        reference.write_kv(want_k, want_v, k, v, loc, kq, vq)
        write_kv_triton(got_k, got_v, k, v, loc, kq, vq)
        name = f"write d{d} k{kb:g} v{vb:g} {variant}"
        problems = [p for p in (write_mismatch(got_k, want_k, kq), write_mismatch(got_v, want_v, vq)) if p]
        record(name, not problems, problems=problems)

        # Attention reads the reference's pool: the comparison is of attention alone.
        lens = torch.tensor(contexts, device=dev)
        kv_indptr = torch.zeros(len(contexts) + 1, dtype=torch.int32, device=dev)
        kv_indptr[1:] = lens.cumsum(0)
        kv_indices = torch.randperm(slots, device=dev, generator=gen)[: int(kv_indptr[-1])].to(torch.int32)
        q = torch.randn(len(contexts), heads * group, d, device=dev, generator=gen).to(torch.bfloat16)
        args = (q, want_k, want_v, kv_indptr, kv_indices, kq, vq, d**-0.5)
        ref = reference.decode_attention(*args)
        for precision in PRECISIONS:
            problem = attention_mismatch(decode_attention_triton(*args, dot_precision=precision), ref, precision)
            record(f"decode d{d} k{kb:g} v{vb:g} {variant} {precision}", problem is None, problem=problem)

        new = torch.tensor([min(c, 9) for c in contexts], device=dev)
        qo_indptr = torch.zeros_like(kv_indptr)
        qo_indptr[1:] = new.cumsum(0)
        qe = torch.randn(int(qo_indptr[-1]), heads * group, d, device=dev, generator=gen).to(torch.bfloat16)
        args = (qe, want_k, want_v, qo_indptr, kv_indptr, kv_indices, kq, vq, d**-0.5)
        ref = reference.extend_attention(*args)
        for precision in PRECISIONS:
            problem = attention_mismatch(extend_attention_triton(*args, dot_precision=precision), ref, precision)
            record(f"extend d{d} k{kb:g} v{vb:g} {variant} {precision}", problem is None, problem=problem)
    return {"passed": True, "cases": cases}


def _peer_backends():
    """bf16 SDPA backends a decode can be run on: (name, context manager factory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return [
        ("sdpa_flash", lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])),
        ("sdpa_efficient", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])),
        ("sdpa_cudnn", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])),
        ("sdpa_math", lambda: sdpa_kernel([SDPBackend.MATH])),
    ]


def _grouped(q, kv_heads: int):
    """Decode queries (batch, q_heads, d) as (batch, kv_heads, group, d): GQA as plain attention of `group` rows per
    KV head, which every SDPA backend runs without expanding K/V (the fair bf16 peer)."""
    return q.view(q.shape[0], kv_heads, q.shape[1] // kv_heads, q.shape[2])


def _flex():
    """flex_attention compiled (GQA decode), or None where this torch has none."""
    try:
        import torch
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(_grouped(q, k.shape[1]), k, v).reshape(q.shape)


def _timed(ctx: Context, fn: Callable[[], object]) -> dict:
    """Eager and CUDA-graph milliseconds of fn (an error becomes a string: a peer that cannot run is reported)."""
    row = {}
    try:
        row["eager_ms"] = ctx.clock(fn)
        replay = graphed(fn, ctx.device)
        row["graph_ms"] = ctx.clock(replay) if replay else None
    except Exception as err:  # a backend missing for this shape or GPU: say which and why
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return row


def _best(peers: dict[str, dict], mode: str) -> tuple[str | None, float | None]:
    timed = {n: r[mode] for n, r in peers.items() if r.get(mode)}
    if not timed:
        return None, None
    name = min(timed, key=timed.get)
    return name, timed[name]


def _bf16_peers(ctx: Context, q, batch: int, context: int, kv_indices, gen, flex) -> dict[str, dict]:
    """bf16 decode at one shape: SDPA on each backend and flex over a contiguous cache, and SDPA over slots gathered
    from a paged cache (what a backend without paged kernels does)."""
    import torch

    s, dev = ctx.plan.shape, ctx.device
    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped = _grouped(q, s.kv_heads)
    k = torch.randn(batch, s.kv_heads, context, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn_like(k)
    peers: dict[str, dict] = {}
    backends = _peer_backends() if dev.type == "cuda" else _peer_backends()[-1:]
    for name, backend in backends:
        peers[name] = _timed(ctx, partial(_sdpa_on, backend, sdpa, grouped, k, v))
    if flex is not None:
        peers["flex"] = _timed(ctx, partial(flex, q, k, v))
    del k, v
    k_pool = torch.randn(batch * context, s.kv_heads, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    v_pool = torch.randn_like(k_pool)
    fastest = _best({n: p for n, p in peers.items() if n.startswith("sdpa")}, "eager_ms")[0]
    backend = dict(backends).get(fastest, backends[-1][1])
    idx = kv_indices.long()

    def gathered():
        kk = k_pool[idx].view(batch, context, s.kv_heads, s.head_dim).transpose(1, 2)
        vv = v_pool[idx].view(batch, context, s.kv_heads, s.head_dim).transpose(1, 2)
        return _sdpa_on(backend, sdpa, grouped, kk, vv)

    peers["sdpa_gathered"] = _timed(ctx, gathered)
    return peers


def _sdpa_on(backend, sdpa, q, k, v):
    with backend():
        return sdpa(q, k, v)


def _decode_shape(ctx: Context, batch: int, context: int, flex) -> list[dict]:
    """TurboQuant decode at bits 4/3/2 against the bf16 peers, at one (batch, context)."""
    import torch

    from tq_serve.kernels.triton_decode import decode_attention_triton

    s, dev = ctx.plan.shape, ctx.device
    tokens = batch * context
    bf16_bytes = 2 * tokens * s.kv_heads * s.head_dim * 2
    if not fits(dev, 2 * bf16_bytes + pool_bytes(quantizer(s.head_dim, 4).layout, tokens, 2 * s.kv_heads)):
        return [{"batch": batch, "context": context, "skipped": "does not fit in device memory"}]
    gen = ctx.generator(batch * 7 + context)
    q = torch.randn(batch, s.q_heads, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    kv_indptr = torch.arange(0, tokens + 1, context, dtype=torch.int32, device=dev)
    # Slots of a long-running server are scattered: a random permutation, not 0..tokens-1.
    kv_indices = torch.randperm(tokens, device=dev, generator=gen).to(torch.int32)
    peers = _bf16_peers(ctx, q, batch, context, kv_indices, gen, flex)
    contiguous = {n: p for n, p in peers.items() if n != "sdpa_gathered"}
    best = {mode: _best(contiguous, f"{mode}_ms") for mode in ("eager", "graph")}
    rows = []
    for bits in ctx.plan.bits:
        if ctx.time_left() < 0:
            rows.append({"batch": batch, "context": context, "bits": bits, "skipped": "time box"})
            continue
        qz = quantizer(s.head_dim, bits)
        k_tq = random_pool(qz.layout, tokens, s.kv_heads, dev, gen)
        v_tq = random_pool(qz.layout, tokens, s.kv_heads, dev, gen)
        args = (q, k_tq, v_tq, kv_indptr, kv_indices, qz, qz, s.head_dim**-0.5)
        tq = _timed(ctx, partial(decode_attention_triton, *args, check_indices=False))
        read = 2 * pool_bytes(qz.layout, tokens, s.kv_heads) + 4 * tokens
        row = {"batch": batch, "context": context, "bits": bits, "bytes_read": read, "bf16_bytes": bf16_bytes}
        row |= {f"tq_{name}": value for name, value in tq.items()}
        for mode, (peer, peer_ms) in best.items():
            ms = tq.get(f"{mode}_ms")
            if ms:
                row[f"{mode}_GBps"] = read / (ms * 1e-3) / 1e9
                row[f"{mode}_of_copy"] = read / (ms * 1e-3) / ctx.copy_bw
                if peer_ms:
                    row[f"{mode}_peer"] = peer
                    row[f"{mode}_speedup"] = peer_ms / ms
        rows.append(row)
        del k_tq, v_tq
    rows.append({"batch": batch, "context": context, "peers": peers})
    return rows


def stage_decode(ctx: Context) -> dict:
    rows, flex = [], None
    for i, (batch, context) in enumerate(ctx.plan.decode_shapes):
        if ctx.time_left() < 0:
            rows.append({"batch": batch, "context": context, "skipped": "time box"})
            continue
        if i == 0 and ctx.device.type == "cuda":
            flex = _flex()  # compiling flex costs tens of seconds: timed at the headline shape only
        rows += _decode_shape(ctx, batch, context, flex if i == 0 else None)
    return {"rows": rows}


def _extend_case(ctx: Context, requests: int, prefix: int, new: int) -> dict:
    import torch

    from tq_serve.kernels.triton_extend import extend_attention_triton

    s, dev = ctx.plan.shape, ctx.device
    gen = ctx.generator(requests + prefix + new)
    length = prefix + new
    q = torch.randn(requests * new, s.q_heads, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    k = torch.randn(requests, s.kv_heads, length, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn_like(k)
    q4 = q.view(requests, new, s.q_heads, s.head_dim).transpose(1, 2)
    # A prefill is SDPA's own causal case (flash); after a cached prefix the mask is bottom-right aligned (an explicit
    # mask, which flash does not take: the efficient or math backend runs it).
    mask = None if prefix == 0 else torch.arange(length, device=dev) <= prefix + torch.arange(new, device=dev)[:, None]
    sdpa = partial(
        torch.nn.functional.scaled_dot_product_attention, q4, k, v, attn_mask=mask, is_causal=prefix == 0,
        enable_gqa=True,
    )  # fmt: skip
    peer = _timed(ctx, sdpa)
    row = {"requests": requests, "prefix": prefix, "new": new, "peer": "sdpa causal (bf16)", "peer_ms": peer}
    qo_indptr = torch.arange(0, requests * new + 1, new, dtype=torch.int32, device=dev)
    kv_indptr = torch.arange(0, requests * length + 1, length, dtype=torch.int32, device=dev)
    kv_indices = torch.randperm(requests * length, device=dev, generator=gen).to(torch.int32)
    bits = ctx.plan.bits[0]
    qz = quantizer(s.head_dim, bits)
    k_tq = random_pool(qz.layout, requests * length, s.kv_heads, dev, gen)
    v_tq = random_pool(qz.layout, requests * length, s.kv_heads, dev, gen)
    args = (q, k_tq, v_tq, qo_indptr, kv_indptr, kv_indices, qz, qz, s.head_dim**-0.5)
    tq = _timed(ctx, partial(extend_attention_triton, *args, max_new_tokens=new, check_indices=False))
    row |= {"bits": bits, "tq_ms": tq}
    if tq.get("eager_ms") and peer.get("eager_ms"):
        row["speedup"] = peer["eager_ms"] / tq["eager_ms"]
    return row


def stage_extend(ctx: Context) -> dict:
    rows = []
    for requests, prefix, new in ctx.plan.extend_cases:
        if ctx.time_left() < 0:
            rows.append({"requests": requests, "prefix": prefix, "new": new, "skipped": "time box"})
            continue
        rows.append(_extend_case(ctx, requests, prefix, new))
    return {"rows": rows}


def _index_put(k_cache, v_cache, loc, k, v) -> None:
    k_cache[loc] = k
    v_cache[loc] = v


def _write_tokens(ctx: Context, tokens: int) -> list[dict]:
    import torch

    from tq_serve.kernels.packed import PackedVectors
    from tq_serve.kernels.triton_write import write_kv_triton

    s, dev = ctx.plan.shape, ctx.device
    gen = ctx.generator(tokens)
    slots = 4 * tokens
    k = torch.randn(tokens, s.kv_heads, s.head_dim, device=dev, generator=gen).to(torch.bfloat16)
    v = torch.randn_like(k)
    loc = torch.randperm(slots, device=dev, generator=gen)[:tokens]
    k_cache = torch.empty(slots, s.kv_heads, s.head_dim, dtype=torch.bfloat16, device=dev)
    peer = _timed(ctx, partial(_index_put, k_cache, torch.empty_like(k_cache), loc, k, v))
    rows = []
    for bits in ctx.plan.bits:
        if ctx.time_left() < 0:
            rows.append({"tokens": tokens, "bits": bits, "skipped": "time box"})
            continue
        qz = quantizer(s.head_dim, bits)
        k_pool = PackedVectors.empty(qz.layout, (slots, s.kv_heads), dev)
        v_pool = PackedVectors.empty(qz.layout, (slots, s.kv_heads), dev)
        tq = _timed(ctx, partial(write_kv_triton, k_pool, v_pool, k, v, loc, qz, qz, check_indices=False))
        moved = 2 * k.numel() * k.element_size() + 2 * pool_bytes(qz.layout, tokens, s.kv_heads) + 8 * tokens
        row = {"tokens": tokens, "bits": bits, "bytes_moved": moved, "tq_ms": tq, "peer": "bf16 index_put"}
        row["peer_ms"] = peer
        ms = tq.get("graph_ms") or tq.get("eager_ms")
        if ms:
            row |= {"GBps": moved / (ms * 1e-3) / 1e9, "of_copy": moved / (ms * 1e-3) / ctx.copy_bw}
            row["tokens_per_s"] = tokens / (ms * 1e-3)
        rows.append(row)
    return rows


def stage_write(ctx: Context) -> dict:
    rows = []
    for tokens in ctx.plan.write_tokens:
        rows += _write_tokens(ctx, tokens)
    return {"rows": rows}


def stage_autotune(ctx: Context) -> dict:
    import triton

    from tq_serve.autotune.spaces import GPU_CHECK_SPACES, TINY_SPACES
    from tq_serve.autotune.store import TuningKey
    from tq_serve.autotune.tuner import device_name, tune_keys

    config_dir = ctx.out / "configs" / "kernels"
    dry = ctx.device.type != "cuda"
    s = ctx.plan.shape
    keys = [
        TuningKey(kernel=kernel, gpu=device_name(), triton=triton.__version__, head_dim=s.head_dim, k_bits=bits,
                  v_bits=bits, group=s.group if kernel == "decode" else 1)
        for kernel in ("decode", "write")
        for bits in ctx.plan.autotune_bits
    ]  # fmt: skip
    results = tune_keys(
        keys,
        spaces=TINY_SPACES if dry else GPU_CHECK_SPACES,
        size="tiny" if dry else "gpu",
        config_dir=config_dir,
        deadline=ctx.deadline,
        progress=lambda line: None,
    )
    return {"config_dir": str(config_dir), "keys": results}


def stage_step(ctx: Context) -> dict:
    from tq_serve.bench.decode_step import DecodeStep

    s, dev = ctx.plan.shape, ctx.device
    batch, context = ctx.plan.step
    rows = []
    for bits in (16, *ctx.plan.bits):
        if ctx.time_left() < 0:
            rows.append({"bits": bits, "skipped": "time box"})
            continue
        step = DecodeStep(s, batch, context, bits, dev, ctx.generator(batch + context))
        t = _timed(ctx, step)
        rows.append({"bits": bits, "batch": batch, "context": context, "layers": s.layers, **t})
        del step
    base = rows[0].get("graph_ms") or rows[0].get("eager_ms")
    for row in rows[1:]:
        ms = row.get("graph_ms") or row.get("eager_ms")
        if base and ms:
            row["speedup_vs_bf16"] = base / ms
            row["tokens_per_s"] = batch / (ms * 1e-3)
    return {"rows": rows}


STAGES: dict[str, Callable[[Context], dict]] = {
    "environment": stage_environment,
    "correctness": stage_correctness,
    "decode": stage_decode,
    "extend": stage_extend,
    "write": stage_write,
    "autotune": stage_autotune,
    "step": stage_step,
}


# ------------------------------------------------------------------------------------------------------------ report


def summary_lines(report: dict) -> list[str]:
    """The headline figures of a report, one per line (what the README quotes)."""
    lines = []
    stages = {s["stage"]: s for s in report["stages"]}
    env = stages.get("environment", {}).get("result", {})
    if env:
        lines.append(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}")
        lines.append(f"copy bandwidth {env['copy_GBps']:.0f} GB/s (read + write)")
    for name, stage in stages.items():
        status = "ok" if stage["ok"] else f"FAILED: {stage.get('error', '')}"
        lines.append(f"stage {name:<12} {stage['seconds']:6.1f} s  {status}")
    for row in stages.get("decode", {}).get("result", {}).get("rows", []):
        if "bits" in row and "skipped" not in row:
            speedup = row.get("graph_speedup") or row.get("eager_speedup") or 0.0
            peer = row.get("graph_peer", row.get("eager_peer"))
            lines.append(
                f"decode b{row['batch']} ctx{row['context']} {row['bits']}-bit: "
                f"{(row.get('tq_graph_ms') or row.get('tq_eager_ms') or 0) * 1e3:.0f} us, "
                f"{row.get('graph_of_copy', row.get('eager_of_copy', 0)):.2f} of copy, "
                f"{speedup:.2f}x vs {peer}"
            )
    for row in stages.get("write", {}).get("result", {}).get("rows", []):
        if "GBps" in row:
            lines.append(
                f"write {row['tokens']} tok {row['bits']}-bit: {row['GBps']:.0f} GB/s, {row['of_copy']:.2f} of copy"
            )
    for row in stages.get("step", {}).get("result", {}).get("rows", []):
        if "speedup_vs_bf16" in row:
            lines.append(
                f"decode step {row['bits']}-bit: {row['speedup_vs_bf16']:.2f}x bf16, {row['tokens_per_s']:.0f} tok/s"
            )
    return lines


def run(plan: Plan, device, out: Path, stages: list[str], progress: Callable[[str], None] = print) -> dict:
    """Run `stages` in order, writing out/gpu_check.json after each; stops at the first failed stage."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_check.json"
    clock = Clock(device)
    ctx = Context(plan=plan, device=device, clock=clock, out=out)
    report = {"benchmark": "gpu", "dry_run": device.type != "cuda", "plan": asdict(plan), "stages": []}
    start = time.monotonic()
    for name in stages:
        t0 = time.monotonic()
        ctx.deadline = t0 + plan.time_box.get(name, math.inf)
        progress(f"== {name} (time box {plan.time_box.get(name, '-')} s)")
        entry: dict = {"stage": name}
        try:
            if name != "environment" and not ctx.copy_bw:
                ctx.copy_bw = copy_bandwidth(device, clock, plan.copy_bytes)
            entry |= {"ok": True, "result": STAGES[name](ctx)}
        except Exception as err:  # recorded with its traceback: a GPU run must leave its evidence behind
            entry |= {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        entry["seconds"] = time.monotonic() - t0
        report["stages"].append(entry)
        report["total_seconds"] = time.monotonic() - start
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        tmp.replace(path)
        progress(f"   {'ok' if entry['ok'] else 'FAILED: ' + entry['error']} ({entry['seconds']:.1f} s) -> {path}")
        if not entry["ok"]:
            break
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory (default: results/gpu/<gpu name>/)")
    parser.add_argument("--dry-run", action="store_true", help="every stage at tiny sizes on CPU (interpreter)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args(argv)
    if args.dry_run and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    import torch

    if args.dry_run:
        device, plan = torch.device("cpu"), DRY
    elif not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA GPU (--dry-run checks the code on a CPU)", file=sys.stderr)
        return 2
    else:
        device, plan = torch.device("cuda"), FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu-dry-run"
    out = args.out or REPO_ROOT / "results" / "gpu" / gpu_slug(name)
    stages = ["environment", *[s for s in args.stages if s != "environment"]]
    report = run(plan, device, out, stages)
    print("\n".join(summary_lines(report)))
    if report["dry_run"]:
        print("DRY RUN (tiny sizes, CPU, Triton interpreter): the timings above are meaningless")
    return 0 if all(s["ok"] for s in report["stages"]) else 1
