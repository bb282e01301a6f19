"""One layer's attention on a CPU, the C++ kernel over the packed pool vs bf16 SDPA.

`python -m tq_serve.bench cpu-attention [--json]`.

At tq-tiny's heads (4 query heads, 2 KV heads, head_dim 128), in one run:

- decode (one new token per request) for each KV setting and context x batch, against two bf16 peers:
  `scaled_dot_product_attention` over the same slots gathered from a bf16 pool (what SGLang's torch_native backend
  does), and over a contiguous bf16 cache (no gather: the fastest bf16 peer the CPU has). Ratios are against the
  faster peer. Slots are a shuffled permutation of the pool, as after a server has run a while.
- bytes moved per token (codes, norms and the slot index of every KV head, against bf16's K and V) and the achieved
  rate, next to a memory-copy bandwidth measured in the same run (read + write bytes per second of a large copy);
- extend: a prefill of --extend-new tokens onto a cached --extend-prefix, causal, against bf16 SDPA with the same
  causal mask over a contiguous cache.

Timing: the median of --repeats wall-clock runs after a warm-up, on torch's threads (the kernel's OpenMP threads
follow them). Run it under `flock /tmp/tq_cpu_bench.lock` on a shared machine; the JSON records the load average
before and after. Writes JSON and a PNG (speed vs context per KV setting) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tq_serve.bench.harness import environment, table, write_report
from tq_serve.kernels import cpu_attention
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer

Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 128
CONTEXTS = {1024: 8, 4096: 4, 16384: 2, 32768: 2, 65536: 1}  # context -> batch
SETTINGS = [(4, "mse"), (3, "mse"), (2, "mse"), (4, "prod")]
# The targets: (bits, variant, context) -> minimum speed-up over the fastest bf16 peer.
DECODE_TARGETS = {(4, "mse", 16384): 1.5, (4, "mse", 32768): 1.5, (4, "mse", 1024): 1.0, (3, "mse", 16384): 1.3}
EXTEND_TARGET = 1.0


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: builds the kernel, touches the pool
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Read + write bytes per second of one large tensor copy (the machine's streaming rate)."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _packed_pool(bits: int, variant: str, slots: int, gen: torch.Generator) -> tuple:
    layout = VectorLayout(head_dim=HEAD_DIM, bits=bits, variant=variant)
    quantizer = get_quantizer(layout)
    pools = []
    for _ in range(2):  # K, V: random codes and positive norms (attention cost does not depend on the values)
        pool = PackedVectors.empty(layout, (slots, KV_HEADS))
        pool.codes.copy_(torch.randint(0, 256, pool.codes.shape, generator=gen, dtype=torch.uint8))
        pool.norms.copy_(torch.rand(pool.norms.shape, generator=gen) + 0.5)
        pools.append(pool)
    return quantizer, pools[0], pools[1]


def bench_decode(context: int, batch: int, repeats: int, gen: torch.Generator) -> list[dict]:
    slots_total = context * batch
    slots = torch.randperm(slots_total, generator=gen)
    indptr = torch.arange(batch + 1) * context
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    scale = HEAD_DIM**-0.5
    # bf16 peers
    k_pool, v_pool = (torch.randn(slots_total, KV_HEADS, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))

    def gathered() -> None:
        for b in range(batch):
            s = slots[b * context : (b + 1) * context]
            k = k_pool.index_select(0, s).transpose(0, 1).unsqueeze(0)
            v = v_pool.index_select(0, s).transpose(0, 1).unsqueeze(0)
            F.scaled_dot_product_attention(q[b : b + 1].unsqueeze(2), k, v, scale=scale, enable_gqa=True)

    k_cache, v_cache = (
        t.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous() for t in (k_pool, v_pool)
    )

    def contiguous() -> None:
        F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, scale=scale, enable_gqa=True)

    bf16_gathered, bf16_contiguous = _median_ms(gathered, repeats), _median_ms(contiguous, repeats)
    fastest = min(bf16_gathered, bf16_contiguous)
    bf16_bytes = KV_HEADS * 2 * HEAD_DIM * 2
    rows = []
    for bits, variant in SETTINGS:
        quantizer, kp, vp = _packed_pool(bits, variant, slots_total, gen)
        ms = _median_ms(
            lambda quantizer=quantizer, kp=kp, vp=vp: cpu_attention.decode_attention(
                q, kp, vp, indptr, slots.to(torch.int32), quantizer, quantizer, scale
            ),
            repeats,
        )
        token_bytes = KV_HEADS * 2 * quantizer.layout.bytes_per_vector + 4  # K and V of each head, the slot index
        rows.append(
            {
                "kind": "decode",
                "setting": f"tq{bits}-{variant}",
                "bits": bits,
                "variant": variant,
                "context": context,
                "batch": batch,
                "tq_ms": ms,
                "bf16_gathered_ms": bf16_gathered,
                "bf16_contiguous_ms": bf16_contiguous,
                "vs_fastest_bf16": fastest / ms,
                "vs_gathered_bf16": bf16_gathered / ms,
                "bytes_per_token": token_bytes,
                "bf16_bytes_per_token": bf16_bytes,
                "tq_gbs": token_bytes * context * batch / (ms * 1e-3) / 1e9,
                "bf16_contiguous_gbs": bf16_bytes * context * batch / (bf16_contiguous * 1e-3) / 1e9,
            }
        )
    return rows


def bench_extend(prefix: int, new: int, repeats: int, gen: torch.Generator) -> dict:
    total = prefix + new
    quantizer, kp, vp = _packed_pool(4, "mse", total, gen)
    slots = torch.randperm(total, generator=gen)
    q = torch.randn(new, Q_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    scale = HEAD_DIM**-0.5
    qo, kv = torch.tensor([0, new]), torch.tensor([0, total])
    tq = _median_ms(
        lambda: cpu_attention.extend_attention(q, kp, vp, qo, kv, slots, quantizer, quantizer, scale), repeats
    )
    k, v = (torch.randn(1, KV_HEADS, total, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    visible = torch.ones(new, total, dtype=torch.bool).tril(prefix)  # query i sees keys <= prefix + i
    qb = q.transpose(0, 1).unsqueeze(0)
    bf16 = _median_ms(
        lambda: F.scaled_dot_product_attention(qb, k, v, attn_mask=visible, scale=scale, enable_gqa=True), repeats
    )
    return {
        "kind": "extend",
        "setting": "tq4-mse",
        "prefix": prefix,
        "new_tokens": new,
        "tq_ms": tq,
        "bf16_causal_ms": bf16,
        "vs_bf16": bf16 / tq,
    }


def targets(decode_rows: list[dict], extend_row: dict | None) -> list[dict]:
    """Each target of the issue with the measured ratio and whether it holds."""
    out = []
    for row in decode_rows:
        need = DECODE_TARGETS.get((row["bits"], row["variant"], row["context"]))
        if need is not None:
            out.append(
                {
                    "what": f"decode {row['setting']} at {row['context']} x {row['batch']} vs fastest bf16",
                    "target": need,
                    "measured": row["vs_fastest_bf16"],
                    "met": row["vs_fastest_bf16"] >= need,
                }
            )
    if extend_row is not None:
        out.append(
            {
                "what": f"extend {extend_row['new_tokens']} onto {extend_row['prefix']} vs bf16 causal SDPA",
                "target": EXTEND_TARGET,
                "measured": extend_row["vs_bf16"],
                "met": extend_row["vs_bf16"] >= EXTEND_TARGET,
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Per KV setting: decode time per call and speed-up over the fastest bf16 peer, vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in rows if r["kind"] == "decode"]
    fig, (ax_ms, ax_x) = plt.subplots(1, 2, figsize=(11, 4))
    contexts = sorted({r["context"] for r in decode})
    first = [r for r in decode if r["setting"] == decode[0]["setting"]]
    ax_ms.plot(contexts, [r["bf16_contiguous_ms"] for r in first], "k--", label="bf16 SDPA, contiguous")
    ax_ms.plot(contexts, [r["bf16_gathered_ms"] for r in first], "k:", label="bf16 SDPA, gathered slots")
    for setting in dict.fromkeys(r["setting"] for r in decode):
        mine = [r for r in decode if r["setting"] == setting]
        ax_ms.plot([r["context"] for r in mine], [r["tq_ms"] for r in mine], "o-", label=f"TurboQuant {setting}")
        ax_x.plot([r["context"] for r in mine], [r["vs_fastest_bf16"] for r in mine], "o-", label=setting)
    ax_x.axhline(1.0, color="k", lw=0.8)
    labels = [f"{c // 1024}k x {next(r['batch'] for r in first if r['context'] == c)}" for c in contexts]
    for ax in (ax_ms, ax_x):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, labels)
        ax.set_xlabel("context x batch")
        ax.grid(alpha=0.3)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms per decode call (one layer)")
    ax_x.set_ylabel("speed vs fastest bf16 peer (x)")
    ax_ms.legend(fontsize=7)
    ax_x.legend(fontsize=7)
    fig.suptitle(
        f"Decode attention on a CPU, {Q_HEADS} q / {KV_HEADS} KV heads, d{HEAD_DIM}, {torch.get_num_threads()} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench cpu-attention", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS), help="decode contexts (tokens)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--extend-prefix", type=int, default=16384)
    parser.add_argument("--extend-new", type=int, default=2048, help="0 skips the extend measurement")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("results/cpu/cpu_attention.json"))
    args = parser.parse_args(argv)
    if not cpu_attention.available():
        print("error: the CPU kernel could not be built (see the log line above); nothing to measure")
        return 1
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    bandwidth = copy_bandwidth_gbs()
    rows: list[dict] = []
    for context in args.contexts:
        rows += bench_decode(context, CONTEXTS.get(context, 1), args.repeats, gen)
    extend = None
    if args.extend_new:
        extend = bench_extend(args.extend_prefix, args.extend_new, max(3, args.repeats // 2), gen)
    load_after = os.getloadavg()
    for row in rows:
        row["tq_of_copy_bandwidth"] = row["tq_gbs"] / bandwidth
    config = {
        "q_heads": Q_HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "copy_bandwidth_gbs": bandwidth,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    report = write_report(args.out, "cpu-attention", config, rows + ([extend] if extend else []))
    report["targets"] = targets(rows, extend)
    report["environment"] = report.get("environment") or environment()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    columns = {
        "setting": "",
        "context": "d",
        "batch": "d",
        "tq_ms": ".2f",
        "bf16_gathered_ms": ".2f",
        "bf16_contiguous_ms": ".2f",
        "vs_fastest_bf16": ".2f",
        "bytes_per_token": "d",
        "tq_gbs": ".2f",
    }
    print(f"copy bandwidth {bandwidth:.1f} GB/s; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(table(rows, columns))
    if extend:
        print(
            f"extend {extend['new_tokens']} onto {extend['prefix']}: TurboQuant {extend['tq_ms']:.0f} ms, "
            f"bf16 causal SDPA {extend['bf16_causal_ms']:.0f} ms ({extend['vs_bf16']:.2f}x)"
        )
    for t in report["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['what']}: {t['measured']:.2f}x (target {t['target']}x)")
    return 0
