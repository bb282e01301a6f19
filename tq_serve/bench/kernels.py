"""Triton kernels vs bf16 attention on one GPU: `python -m tq_serve.bench kernels [--json] [--smoke]`.

Needs torch and Triton only (no SGLang, no pydantic, no weights), so it runs on a bare GPU box. Every number is
measured in the same run as its peer:

- decode attention at Llama-3.1-8B shapes (32 query heads, 8 KV heads, head_dim 128) over batch x context x bits,
  against bf16 peers on a contiguous bf16 cache: torch scaled_dot_product_attention and, when it compiles,
  flex_attention; the fastest peer is the reference for the speed-up;
- achieved bandwidth: the packed bytes a decode call must read (codes, norms, slot indices) per second, as a
  fraction of a device-to-device copy measured in the same run (read + write bytes per second);
- the write kernel (quantize + scatter K and V) against a bf16 paged cache write, in tokens/s;
- a whole decode step at 8B shapes (32 layers: RMSNorm, QKV, K/V write, attention, O, MLP) with random weights,
  TurboQuant vs bf16, under CUDA graphs. One layer's weights and one layer's cache serve all 32 layers: each is
  far larger than L2, so every layer still streams them from HBM and the time matches distinct layers.

Timing: triton.testing.do_bench (median of CUDA-event timed runs). --smoke runs a tiny version on CPU under the
Triton interpreter (tiny shapes on the GPU where there is one) to prove the code runs; its timings are meaningless and
flagged so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModelShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    layers: int


LLAMA_8B = ModelShape(q_heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, layers=32)
SMOKE_SHAPE = ModelShape(q_heads=4, kv_heads=2, head_dim=64, hidden=128, intermediate=256, layers=2)


# ------------------------------------------------------------------------------------------------ timing, environment


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds per call: do_bench's median on CUDA; on CPU one wall-clock run (smoke only: the interpreter
    compiles nothing, so there is nothing to warm up)."""
    if device.type == "cuda":
        import triton.testing

        def median(fn: Callable[[], object]) -> float:
            result = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
            return float(result[0] if isinstance(result, (list, tuple)) else result)

        return median

    def wall(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    import triton

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _fits(device: torch.device, nbytes: int) -> bool:
    """Whether nbytes more fit in device memory with headroom (always true on CPU: smoke shapes are tiny)."""
    if device.type != "cuda":
        return True
    torch.cuda.empty_cache()  # memory the caching allocator holds from the previous shape is free for this one
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.8 * free


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    """Device-to-device copy, read + write bytes per second: the ceiling a memory-bound kernel is held against."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (timer(lambda: dst.copy_(src)) * 1e-3)


# ---------------------------------------------------------------------------------------------------------- the data


def _quantizers(head_dim: int, bits: float, variant: str):
    from tq_serve.kernels.layout import VectorLayout
    from tq_serve.kernels.quantizer import get_quantizer

    qz = get_quantizer(VectorLayout(head_dim=head_dim, bits=bits, variant=variant))
    return qz, qz


def packed_pool(layout, slots: int, kv_heads: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Random codes and signs with valid float16 norms of 1 (random norm bytes could be NaN or inf)."""
    pool = torch.randint(0, 256, (slots, kv_heads, layout.bytes_per_vector), dtype=torch.uint8, generator=gen)
    if not layout.is_raw:
        one = torch.tensor([1.0], dtype=getattr(torch, layout.norm_dtype)).view(torch.uint8)
        offsets = [layout.norm_offset] + ([layout.rnorm_offset] if layout.variant == "prod" else [])
        for offset in offsets:
            pool[..., offset : offset + one.numel()] = one
    return pool.to(device)


# ------------------------------------------------------------------------------------------------------------ decode


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Decode queries (batch, q_heads, d) as (batch, kv_heads, group, d): a GQA decode is then plain attention of
    `group` query rows per KV head, which every SDPA backend runs without expanding K/V (the fair bf16 peer)."""
    return q.view(q.shape[0], kv_heads, q.shape[1] // kv_heads, q.shape[2])


def _sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (batch, q_heads, d), contiguous k/v (batch, kv_heads, context, d) -> (batch, q_heads, d)."""
    out = torch.nn.functional.scaled_dot_product_attention(_grouped(q, k.shape[1]), k, v)
    return out.reshape(q.shape)


def _flex_decode():
    """flex_attention compiled for decode (no mask, GQA), or None where it is not available on this install."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(_grouped(q, k.shape[1]), k, v).reshape(q.shape)


def tuned_config(kernel: str, head_dim: int, bits: float, group: int, variant: str) -> tuple[dict, str]:
    """(config, source) that autotune's lookup gives this GPU; source "rule" means nothing tuned applies."""
    import triton

    from tq_serve.autotune.store import TuningKey, lookup
    from tq_serve.autotune.tuner import device_name

    key = TuningKey(kernel=kernel, gpu=device_name(), triton=triton.__version__, head_dim=head_dim, k_bits=bits,
                    v_bits=bits, group=group, variant=variant)  # fmt: skip
    return lookup(key)


def bench_decode(
    shape: ModelShape,
    batch: int,
    context: int,
    bits_list: list[float],
    variant: str,
    peers: list[str],
    device: torch.device,
    timer,
    copy_bw: float,
    flex,
    dot_precision: str,
) -> list[dict]:
    """One (batch, context): the bf16 peers, then TurboQuant at each bits value."""
    from tq_serve.kernels.triton_decode import decode_attention_triton

    gen = torch.Generator().manual_seed(batch * 7 + context)
    hq, hkv, d = shape.q_heads, shape.kv_heads, shape.head_dim
    tokens = batch * context
    bf16_bytes = 2 * tokens * hkv * d * 2
    rows = []
    q = torch.randn(batch, hq, d, generator=gen).to(device=device, dtype=torch.bfloat16)
    peer_ms: dict[str, float] = {}
    if _fits(device, bf16_bytes):
        k = torch.randn(batch, hkv, context, d, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        if "sdpa" in peers:
            peer_ms["sdpa"] = timer(lambda: _sdpa_decode(q, k, v))
        if "flex" in peers and flex is not None:
            try:
                peer_ms["flex"] = timer(lambda: flex(q, k, v))
            except Exception as err:  # flex decoding needs a GPU backend and a recent torch; report, do not fail
                print(f"flex_attention skipped at batch {batch} context {context}: {type(err).__name__}: {err}")
        del k, v
    best_peer = min(peer_ms, key=peer_ms.get) if peer_ms else None
    kv_indptr = torch.arange(0, tokens + 1, context, dtype=torch.int32, device=device)
    kv_indices = torch.arange(tokens, dtype=torch.int32, device=device)
    for bits in bits_list:
        k_qz, v_qz = _quantizers(d, bits, variant)
        packed = tokens * hkv * (k_qz.layout.bytes_per_vector + v_qz.layout.bytes_per_vector)
        row = {"kernel": "decode", "batch": batch, "context": context, "bits": bits, "variant": variant}
        if not _fits(device, packed + tokens * 4):
            rows.append(row | {"skipped": "does not fit in device memory"})
            continue
        k_pool = packed_pool(k_qz.layout, tokens, hkv, device, gen)
        v_pool = packed_pool(v_qz.layout, tokens, hkv, device, gen)
        args = (q, k_pool, v_pool, kv_indptr, kv_indices, k_qz, v_qz, d**-0.5)
        launch = {"check_indices": False, "dot_precision": dot_precision}
        ms = timer(lambda: decode_attention_triton(*args, **launch))  # noqa: B023 (called right here)
        # The config serving would use (configs/kernels/ via autotune's lookup) against the launcher defaults above.
        tuned, source = tuned_config("decode", d, bits, hq // hkv, variant)
        tuned_ms = timer(lambda: decode_attention_triton(*args, **launch, **tuned)) if source != "rule" else None  # noqa: B023
        read = packed + tokens * kv_indices.element_size()
        row |= {
            "tq_us": ms * 1e3,
            "peer": best_peer,
            "peer_us": peer_ms[best_peer] * 1e3 if best_peer else None,
            "speedup": peer_ms[best_peer] / ms if best_peer else None,
            "tq_GBps": read / (ms * 1e-3) / 1e9,
            "of_copy_bw": read / (ms * 1e-3) / copy_bw,
            "peer_GBps": bf16_bytes / (peer_ms[best_peer] * 1e-3) / 1e9 if best_peer else None,
            "bytes_vs_bf16": bf16_bytes / read,
            "config_source": source,
            "tuned_config": tuned if tuned_ms else None,
            "tuned_us": tuned_ms * 1e3 if tuned_ms else None,
            "tuned_vs_default": ms / tuned_ms if tuned_ms else None,
            "tuned_speedup": peer_ms[best_peer] / tuned_ms if best_peer and tuned_ms else None,
            **{f"{name}_us": t * 1e3 for name, t in peer_ms.items()},
        }
        rows.append(row)
        del k_pool, v_pool
    return rows


# ------------------------------------------------------------------------------------------------------------- write


def bench_write(shape: ModelShape, tokens: int, bits_list: list[float], variant: str, device, timer) -> list[dict]:
    """Quantize + scatter K and V of `tokens` tokens, against the bf16 paged write `cache[loc] = k`."""
    from tq_serve.kernels.triton_write import write_kv_triton

    gen = torch.Generator().manual_seed(tokens)
    hkv, d = shape.kv_heads, shape.head_dim
    slots = 4 * tokens
    k = torch.randn(tokens, hkv, d, generator=gen).to(device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    loc = torch.randperm(slots, generator=gen)[:tokens].to(device)
    k_cache = torch.empty(slots, hkv, d, dtype=torch.bfloat16, device=device)
    v_cache = torch.empty_like(k_cache)

    def bf16_write() -> None:
        k_cache[loc] = k
        v_cache[loc] = v

    peer_ms = timer(bf16_write)
    rows = []
    for bits in bits_list:
        k_qz, v_qz = _quantizers(d, bits, variant)
        k_pool = torch.zeros(slots, hkv, k_qz.layout.bytes_per_vector, dtype=torch.uint8, device=device)
        v_pool = torch.zeros(slots, hkv, v_qz.layout.bytes_per_vector, dtype=torch.uint8, device=device)
        args = (k_pool, v_pool, k, v, loc, k_qz, v_qz)
        ms = timer(lambda: write_kv_triton(*args, check_indices=False))  # noqa: B023 (called right here)
        moved = 2 * k.numel() * k.element_size() + tokens * hkv * (
            k_qz.layout.bytes_per_vector + v_qz.layout.bytes_per_vector
        )
        rows.append(
            {
                "kernel": "write",
                "tokens": tokens,
                "bits": bits,
                "variant": variant,
                "tq_us": ms * 1e3,
                "peer": "bf16 index_put",
                "peer_us": peer_ms * 1e3,
                "speedup": peer_ms / ms,
                "tokens_per_s": tokens / (ms * 1e-3),
                "tq_GBps": moved / (ms * 1e-3) / 1e9,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ a whole decode step


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * weight


class DecodeStep:
    """One decode step of a Llama-like model with random bf16 weights; attention is bf16 SDPA or TurboQuant."""

    def __init__(
        self, shape: ModelShape, batch: int, context: int, bits: float, variant: str, device, gen, dot_precision: str
    ) -> None:
        s = shape
        self.dot_precision = dot_precision
        self.shape, self.batch, self.context, self.bits = s, batch, context, bits
        dt = torch.bfloat16

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=gen) / math.sqrt(cols)).to(device=device, dtype=dt)

        self.w_qkv = weight(s.hidden, (s.q_heads + 2 * s.kv_heads) * s.head_dim)
        self.w_o = weight(s.q_heads * s.head_dim, s.hidden)
        self.w_gate_up = weight(s.hidden, 2 * s.intermediate)
        self.w_down = weight(s.intermediate, s.hidden)
        self.norm = torch.ones(s.hidden, dtype=dt, device=device)
        self.x = torch.randn(batch, s.hidden, generator=gen).to(device=device, dtype=dt)
        tokens = batch * context
        if bits == 16:
            self.k_cache = torch.randn(batch, s.kv_heads, context, s.head_dim, generator=gen).to(device, dt)
            self.v_cache = torch.randn_like(self.k_cache)
        else:
            self.k_qz, self.v_qz = _quantizers(s.head_dim, bits, variant)
            self.k_pool = packed_pool(self.k_qz.layout, tokens, s.kv_heads, device, gen)
            self.v_pool = packed_pool(self.v_qz.layout, tokens, s.kv_heads, device, gen)
            self.kv_indptr = torch.arange(0, tokens + 1, context, dtype=torch.int32, device=device)
            self.kv_indices = torch.arange(tokens, dtype=torch.int32, device=device)
            # The step's new token goes to the last slot of each request (the kernel then attends to it).
            self.loc = self.kv_indptr[1:].long() - 1

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.shape
        if self.bits == 16:
            pos = self.context - 1
            self.k_cache[:, :, pos] = k
            self.v_cache[:, :, pos] = v
            return _sdpa_decode(q, self.k_cache, self.v_cache)
        from tq_serve.kernels.triton_decode import decode_attention_triton
        from tq_serve.kernels.triton_write import write_kv_triton

        write_kv_triton(self.k_pool, self.v_pool, k, v, self.loc, self.k_qz, self.v_qz, check_indices=False)
        return decode_attention_triton(
            q, self.k_pool, self.v_pool, self.kv_indptr, self.kv_indices, self.k_qz, self.v_qz,
            s.head_dim**-0.5, check_indices=False, dot_precision=self.dot_precision,
        )  # fmt: skip

    def __call__(self) -> torch.Tensor:
        s, b = self.shape, self.batch
        x = self.x
        for _ in range(s.layers):
            qkv = _rms_norm(x, self.norm) @ self.w_qkv
            q, k, v = qkv.split([s.q_heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], dim=-1)
            attn = self.attention(
                q.reshape(b, s.q_heads, s.head_dim),
                k.reshape(b, s.kv_heads, s.head_dim),
                v.reshape(b, s.kv_heads, s.head_dim),
            )
            x = x + attn.reshape(b, -1) @ self.w_o
            gate, up = (_rms_norm(x, self.norm) @ self.w_gate_up).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ self.w_down
        return x


def _graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], object], bool]:
    """fn replayed from a CUDA graph (how SGLang runs decode), or fn itself where capture is not possible."""
    if device.type != "cuda":
        return fn, False
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile the Triton kernels and settle allocations before capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, True
    except Exception as err:  # report eager timings rather than nothing
        print(f"CUDA graph capture failed ({type(err).__name__}: {err}); timing eager launches")
        return fn, False


def bench_step(shape, batch, context, bits_list, variant, device, timer, dot_precision: str) -> list[dict]:
    gen = torch.Generator().manual_seed(batch + context)
    per_layer_bf16 = 2 * batch * context * shape.kv_heads * shape.head_dim * 2
    if not _fits(device, per_layer_bf16 + 2 * shape.hidden * (shape.hidden + 3 * shape.intermediate) * 2):
        return [{"kernel": "step", "batch": batch, "context": context, "skipped": "does not fit in device memory"}]
    step = DecodeStep(shape, batch, context, 16, variant, device, gen, dot_precision)
    run, graphed = _graphed(step, device)
    bf16_ms = timer(run)
    del step, run
    rows = []
    for bits in bits_list:
        step = DecodeStep(shape, batch, context, bits, variant, device, gen, dot_precision)
        run, graphed_tq = _graphed(step, device)
        ms = timer(run)
        rows.append(
            {
                "kernel": "step",
                "batch": batch,
                "context": context,
                "layers": shape.layers,
                "bits": bits,
                "variant": variant,
                "tq_us": ms * 1e3,
                "peer": "bf16 sdpa",
                "peer_us": bf16_ms * 1e3,
                "speedup": bf16_ms / ms,
                "tq_tokens_per_s": batch / (ms * 1e-3),
                "peer_tokens_per_s": batch / (bf16_ms * 1e-3),
                "cuda_graph": graphed and graphed_tq,
            }
        )
        del step, run
    return rows


# -------------------------------------------------------------------------------------------------------------- main


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    cells = [[format(r[k], spec) if r.get(k) is not None else "-" for k, spec in columns.items()] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _print_tables(report: dict) -> None:
    env = report["environment"]
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}")
    if not report["timings_meaningful"]:
        print("SMOKE RUN (tiny shapes; on CPU under the Triton interpreter): the timings below are meaningless")
    print(f"device-to-device copy: {report['copy_GBps']:.1f} GB/s (read + write)\n")
    groups = {
        "decode": {"batch": "d", "context": "d", "bits": "g", "tq_us": ".1f", "peer": "", "peer_us": ".1f",
                   "speedup": ".2f", "tq_GBps": ".0f", "of_copy_bw": ".2f", "bytes_vs_bf16": ".2f",
                   "config_source": "", "tuned_vs_default": ".2f"},
        "write": {"tokens": "d", "bits": "g", "tq_us": ".1f", "peer_us": ".1f", "speedup": ".2f",
                  "tokens_per_s": ".3g", "tq_GBps": ".0f"},
        "step": {"batch": "d", "context": "d", "bits": "g", "tq_us": ".0f", "peer_us": ".0f", "speedup": ".2f",
                 "tq_tokens_per_s": ".0f", "peer_tokens_per_s": ".0f", "cuda_graph": ""},
    }  # fmt: skip
    for kernel, columns in groups.items():
        rows = [r for r in report["rows"] if r["kernel"] == kernel and "skipped" not in r]
        if rows:
            print(f"{kernel}:\n{_table(rows, columns)}\n")
    skipped = [r for r in report["rows"] if "skipped" in r]
    for r in skipped:
        print(f"skipped {r['kernel']} batch {r.get('batch')} context {r.get('context')}: {r['skipped']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--bits", type=float, nargs="+", default=[2, 3, 4])
    parser.add_argument("--variant", default="mse", choices=["mse", "prod"])
    parser.add_argument("--peers", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex"])
    parser.add_argument("--write-tokens", type=int, nargs="+", default=[32, 8192])
    parser.add_argument("--step-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--step-context", type=int, nargs="+", default=[8192])
    parser.add_argument(
        "--dot-precision", default="tf32x3", choices=["tf32x3", "tf32", "ieee"], help="tl.dot input precision"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "write", "step"])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the tables")
    parser.add_argument("--out", type=Path, default=Path("bench-results/kernels.json"))
    args = parser.parse_args(argv)

    if args.smoke:
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            if "triton" not in sys.modules:
                os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
            device = torch.device("cpu")
        shape = SMOKE_SHAPE
        batches, contexts, step_batches, step_contexts = [2], [17], [2], [9]
        write_tokens, bits_list, peers = [5], [b for b in args.bits if b in (2, 4)] or [4], ["sdpa"]
    elif not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU (use --smoke to check the code on CPU)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        shape = LLAMA_8B
        batches, contexts, step_batches, step_contexts = args.batch, args.context, args.step_batch, args.step_context
        write_tokens, bits_list, peers = args.write_tokens, args.bits, args.peers
    bits_list = [int(b) if b == int(b) else b for b in bits_list]

    timer = _timer(device)
    copy_bw = copy_bandwidth(device, timer, 1 << (30 if device.type == "cuda" else 20))
    flex = _flex_decode() if "flex" in peers else None
    rows: list[dict] = []
    if "decode" not in args.skip:
        for batch in batches:
            for context in contexts:
                rows += bench_decode(
                    shape, batch, context, bits_list, args.variant, peers, device, timer, copy_bw, flex,
                    args.dot_precision,
                )  # fmt: skip
    if "write" not in args.skip:
        for tokens in write_tokens:
            rows += bench_write(shape, tokens, bits_list, args.variant, device, timer)
    if "step" not in args.skip:
        for batch in step_batches:
            for context in step_contexts:
                rows += bench_step(shape, batch, context, bits_list, args.variant, device, timer, args.dot_precision)

    report = {
        "benchmark": "kernels",
        "environment": environment(device),
        "timings_meaningful": device.type == "cuda" and not args.smoke,
        "shape": asdict(shape),
        "dot_precision": args.dot_precision,
        "copy_GBps": copy_bw / 1e9,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_tables(report)
    if report["timings_meaningful"]:
        medians = [r["speedup"] for r in rows if r["kernel"] == "decode" and r.get("speedup")]
        if medians:
            print(f"decode speed-up over the fastest bf16 peer: median {statistics.median(medians):.2f}x")
    return 0
