"""Tune a per-layer bit schedule from calibration data (docs/ARCHITECTURE.md section 6).

    python -m tq_serve.tune_schedule --model tq-tiny --budget 3.0 --out configs/schedules/tq-tiny-3.0.yaml

1. Run the model on calibration text (configs/calibration/python_code.txt unless --calib) in windows, through the
   KV-transform attention of tq_serve.schedule_eval: each layer's query, K after RoPE and V, exactly as the cache
   would store them.
2. For every layer and every candidate (k_bits, v_bits), measure the relative squared error that quantizing K and V
   causes in the layer's attention output after o_proj (what the layer adds to the residual stream):

       err[l][k, v] = sum ||o_proj(A(q, K~k, V~v)) - o_proj(A(q, K, V))||^2 / sum ||o_proj(A(q, K, V))||^2

   summed over all calibration tokens, where A is the layer's causal (GQA) softmax attention and K~k is K through
   the k-bit quantizer. The quantized attention probabilities are computed once per k_bits and reused for every
   v_bits, so a layer costs |k candidates| softmaxes and |k| x |v| value products per window.
3. With --metric logits (the default), weight each layer's errors by its logit gain: the KL of the final next-token
   distribution when only that layer is quantized (at the smallest candidate bits), per unit of its relative error.
   A relative error counts every layer alike; the gain says how much an error in this layer matters at the output.
   On tq-tiny the unweighted metric (--metric attention) put layer 0 at 2-bit K and lost to uniform bits at the
   same budget (held-out KL 0.021 vs 0.014 at 3.0); weighted by the gains the tuned schedules beat uniform.
   --metric kl measures what the gains estimate: the KL with one layer at a time quantized at each candidate pair,
   one forward pass per (layer, pair, window); 5.5 min instead of 1 on tq-tiny, and it picked the same schedule at
   3.0 bits up to half a bit in two layers, which is what backs the estimate.
4. Choose per-layer bits minimising the summed error with average bits <= budget (exact knapsack,
   tq_serve.schedule.solve_budget), then write the schedule YAML and a PNG of per-layer sensitivity.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from tq_serve.kernels.layout import RAW_BITS
from tq_serve.schedule import (
    PROD_BITS,
    REPO_ROOT,
    SCHEDULE_BITS,
    SCHEDULES_DIR,
    BitSchedule,
    ScheduleError,
    solve_budget,
)
from tq_serve.schedule_eval import (
    DEFAULT_WINDOW,
    kv_transform,
    layer_quantizer,
    load_model,
    roundtrip,
    token_windows,
)

DEFAULT_CALIBRATION = REPO_ROOT / "configs" / "calibration" / "python_code.txt"

Pair = tuple[float, float]
METRICS = {
    "kl": "the summed KL of the final next-token distribution measured with one layer at a time quantized at each "
    "candidate pair",
    "attention": "the summed relative attention-output error (after o_proj) of the layers",
    "logits": "the estimated KL of the final next-token distribution: each layer's relative attention-output error "
    "times its logit gain",
}
METRIC_LABELS = {
    "kl": "measured logit KL (nats/token)",
    "attention": "relative error of attention output",
    "logits": "estimated logit KL (nats/token)",
}


class AttentionErrorProbe:
    """A KVTransform that leaves K/V untouched and accumulates, per layer, the squared attention-output error of
    every candidate (k_bits, v_bits) and the squared norm of the exact output."""

    def __init__(
        self,
        num_layers: int,
        head_dim: int,
        bits: Sequence[float],
        *,
        variant: str = "mse",
        seed: int = 0,
        rotation: str = "qr",
        norm_correction: bool = False,
        progress: tqdm | None = None,
    ):
        options = {"variant": variant, "seed": seed, "rotation": rotation, "norm_correction": norm_correction}
        self.quantizers = {b: layer_quantizer(head_dim, b, **options) for b in bits}
        self.squared_error = [dict.fromkeys(itertools.product(bits, bits), 0.0) for _ in range(num_layers)]
        self.squared_norm = [0.0] * num_layers
        self.progress = progress

    @torch.no_grad()
    def __call__(self, module, query, key, value):
        batch, hkv, tokens, d = key.shape
        group = query.shape[1] // hkv
        # Query heads that share a KV head become extra rows, (B * Hkv, group * T, d): K/V are never repeated.
        q = query.float().reshape(batch * hkv, group * tokens, d)
        positions = torch.arange(tokens, device=q.device)
        future = positions[None, :] > positions.repeat(group)[:, None]
        weight = module.o_proj.weight.float().T  # the bias would cancel in the difference

        def probabilities(k: torch.Tensor) -> torch.Tensor:
            scores = q @ k.float().reshape(batch * hkv, tokens, d).transpose(1, 2) * module.scaling
            return scores.masked_fill(future, float("-inf")).softmax(dim=-1)

        def layer_outputs(probs: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
            """o_proj(attention) for each V in values at once: (len(values), B, T, hidden)."""
            n = len(values)
            heads = probs @ torch.cat(values, dim=-1).float().reshape(batch * hkv, tokens, n * d)
            heads = heads.reshape(batch, hkv, group, tokens, n, d).permute(4, 0, 3, 1, 2, 5)
            return heads.reshape(n, batch, tokens, hkv * group * d) @ weight

        exact = layer_outputs(probabilities(key), [value])
        layer = module.layer_idx
        self.squared_norm[layer] += exact.square().sum().item()
        values = [roundtrip(qz, value) for qz in self.quantizers.values()]
        for k_bits, k_quantizer in self.quantizers.items():
            outputs = layer_outputs(probabilities(roundtrip(k_quantizer, key)), values)
            errors = (outputs - exact).square().sum(dim=(1, 2, 3)).tolist()
            for v_bits, error in zip(self.quantizers, errors, strict=True):
                self.squared_error[layer][k_bits, v_bits] += error
        if self.progress is not None:
            self.progress.update()
        return key, value

    def relative_errors(self) -> list[dict[Pair, float]]:
        """err[layer][(k_bits, v_bits)]: squared error over squared norm of the exact output, all tokens pooled."""
        return [
            {pair: error / max(norm, 1e-30) for pair, error in errors.items()}
            for errors, norm in zip(self.squared_error, self.squared_norm, strict=True)
        ]


def measure_errors(
    lm,
    windows: Sequence[torch.Tensor],
    bits: Sequence[float],
    *,
    variant: str = "mse",
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    show_progress: bool = True,
) -> list[dict[Pair, float]]:
    """Per-layer relative attention-output error of every (k_bits, v_bits) in bits x bits, on the windows."""
    config = lm.config
    with tqdm(total=len(windows) * config.num_hidden_layers, desc="layers x windows", disable=not show_progress) as bar:
        probe = AttentionErrorProbe(
            config.num_hidden_layers,
            config.head_dim,
            bits,
            variant=variant,
            seed=seed,
            rotation=rotation,
            norm_correction=norm_correction,
            progress=bar,
        )
        with torch.no_grad(), kv_transform(probe):
            for ids in windows:
                lm(input_ids=ids[None], use_cache=False)
    return probe.relative_errors()


class SingleLayerKV:
    """A KVTransform that round-trips K and V of one layer only (the others attend to exact K/V)."""

    def __init__(self, layer: int, k_quantizer, v_quantizer):
        self.layer, self.k_quantizer, self.v_quantizer = layer, k_quantizer, v_quantizer

    def __call__(self, module, query, key, value):
        if module.layer_idx != self.layer:
            return key, value
        return roundtrip(self.k_quantizer, key), roundtrip(self.v_quantizer, value)


@torch.no_grad()
def measure_layer_kl(
    lm,
    windows: Sequence[torch.Tensor],
    bits: Sequence[float],
    *,
    variant: str = "mse",
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    show_progress: bool = True,
) -> list[dict[Pair, float]]:
    """kl[layer][(k_bits, v_bits)]: KL(exact || quantized) of the final next-token distribution, nats per token,
    with only that layer's K and V quantized at that pair: measured, one forward pass per layer, pair and window.

    Summed over layers it estimates a schedule's KL (the per-layer effects of small errors add to first order)."""
    head_dim, num_layers = lm.config.head_dim, lm.config.num_hidden_layers
    options = {"variant": variant, "seed": seed, "rotation": rotation, "norm_correction": norm_correction}
    quantizers = {b: layer_quantizer(head_dim, b, **options) for b in bits}
    pairs = [pair for pair in itertools.product(bits, bits) if pair != (RAW_BITS, RAW_BITS)]
    kl = [dict.fromkeys(itertools.product(bits, bits), 0.0) for _ in range(num_layers)]
    tokens = 0
    with tqdm(total=len(windows) * num_layers * len(pairs), desc="layer KL", disable=not show_progress) as bar:
        for ids in windows:
            with kv_transform(None):
                exact = lm(input_ids=ids[None], use_cache=False).logits[0].float().log_softmax(-1)
            for layer in range(num_layers):
                for k_bits, v_bits in pairs:
                    with kv_transform(SingleLayerKV(layer, quantizers[k_bits], quantizers[v_bits])):
                        quantized = lm(input_ids=ids[None], use_cache=False).logits[0].float().log_softmax(-1)
                    divergence = torch.nn.functional.kl_div(quantized, exact, log_target=True, reduction="sum")
                    kl[layer][k_bits, v_bits] += divergence.item()
                    bar.update()
            tokens += len(ids)
    return [{pair: value / tokens for pair, value in table.items()} for table in kl]


@torch.no_grad()
def measure_logit_gains(
    lm,
    windows: Sequence[torch.Tensor],
    errors: Sequence[dict[Pair, float]],
    bits: float,
    *,
    variant: str = "mse",
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    show_progress: bool = True,
) -> list[float]:
    """Per layer: KL(exact || quantized) of the final next-token distribution, in nats per token, when only that
    layer's K and V are quantized at `bits`, divided by the layer's relative attention error at (bits, bits).

    A small error e in a layer's output moves the logits by O(e) and the KL by O(e^2), i.e. in proportion to the
    relative squared error measured per layer; the gain is that proportion, so gain * err estimates each
    candidate's KL and makes layers comparable where a relative error alone counts every layer alike.
    """
    options = {"variant": variant, "seed": seed, "rotation": rotation, "norm_correction": norm_correction}
    kl = measure_layer_kl(lm, windows, [bits], show_progress=show_progress, **options)
    return [table[bits, bits] / max(error[bits, bits], 1e-30) for table, error in zip(kl, errors, strict=True)]


def plot_sensitivity(
    errors: Sequence[dict[Pair, float]],
    schedule: BitSchedule,
    path: Path,
    uniform_bits: Sequence[float],
    metric: str = "attention",
) -> Path:
    """Two panels: per-layer error at uniform bits with the chosen schedule's error marked; the chosen bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(errors)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, height_ratios=(3, 2))
    for b in uniform_bits:
        if (b, b) in errors[0]:
            top.plot(layers, [e[b, b] for e in errors], marker=".", lw=1, label=f"K=V={b:g} bits")
    chosen = [errors[i][pair] for i, pair in enumerate(schedule.layer_bits)]
    top.plot(layers, chosen, "k*", ms=10, label="chosen")
    top.set_yscale("log")
    top.set_ylabel(METRIC_LABELS[metric], fontsize=8)
    top.set_title(f"{schedule.name}: per-layer sensitivity ({schedule.model}, budget {schedule.budget:g} bits)")
    top.legend(fontsize=7, ncol=3)
    top.grid(alpha=0.3)
    width = 0.38
    shown = [[min(b, 6) for b in pair] for pair in schedule.layer_bits]  # raw layers drawn at 6, labelled 16
    bottom.bar([i - width / 2 for i in layers], [k for k, _ in shown], width, label="k_bits")
    bottom.bar([i + width / 2 for i in layers], [v for _, v in shown], width, label="v_bits")
    for i, (k, v) in enumerate(schedule.layer_bits):
        bottom.text(i, max(min(k, 6), min(v, 6)) + 0.1, f"{k:g}/{v:g}", ha="center", fontsize=7)
    bottom.axhline(schedule.budget, color="grey", ls="--", lw=1, label=f"budget {schedule.budget:g}")
    bottom.set_ylim(0, 7)
    bottom.set_ylabel("bits")
    bottom.set_xlabel("layer")
    bottom.set_xticks(layers)
    bottom.legend(fontsize=7, ncol=3, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def pin_boundary_layers(errors: list[dict[Pair, float]], boundary: int) -> list[dict[Pair, float]]:
    """The first and last `boundary` layers allowed only raw 16-bit K and V (no error), as vLLM's TurboQuant keeps
    its boundary layers; the knapsack then spends the rest of the budget on the others."""
    n = len(errors)
    if boundary < 0 or 2 * boundary >= n:
        raise ScheduleError(f"--boundary-layers {boundary}: must leave at least one of the {n} layers to quantize")
    edge = set(range(boundary)) | set(range(n - boundary, n))
    return [{(RAW_BITS, RAW_BITS): 0.0} if i in edge else table for i, table in enumerate(errors)]


def tune(
    model: str,
    budget: float,
    *,
    calib: Path = DEFAULT_CALIBRATION,
    out: Path | None = None,
    name: str | None = None,
    bits: Sequence[float] = SCHEDULE_BITS,
    variant: str = "mse",
    seed: int = 0,
    rotation: str = "qr",
    norm_correction: bool = False,
    window: int = DEFAULT_WINDOW,
    max_tokens: int | None = None,
    metric: str = "logits",
    boundary_layers: int = 0,
    plot: bool = True,
    show_progress: bool = True,
    command: str = "",
) -> BitSchedule:
    """Measure, solve, and write the schedule (and its plot next to it); returns the schedule."""
    name = name or (out.stem if out else f"{Path(model).name}-{budget:g}")
    out = out or SCHEDULES_DIR / f"{name}.yaml"
    lm, tokenizer, _ = load_model(model)
    windows = token_windows(tokenizer, calib.read_text(), window, max_tokens)
    if not windows:
        raise ScheduleError(f"calibration text {calib} has fewer than 2 tokens")
    quantization = {"variant": variant, "seed": seed, "rotation": rotation, "norm_correction": norm_correction}
    if metric == "kl":
        errors = measure_layer_kl(lm, windows, bits, show_progress=show_progress, **quantization)
    else:
        errors = measure_errors(lm, windows, bits, show_progress=show_progress, **quantization)
    provenance: dict = {}
    if metric == "logits":
        gains = measure_logit_gains(lm, windows, errors, min(bits), show_progress=show_progress, **quantization)
        errors = [{pair: gain * e for pair, e in table.items()} for table, gain in zip(errors, gains, strict=True)]
        provenance["logit_gain"] = [float(f"{g:.4g}") for g in gains]
    solved = errors
    if boundary_layers:
        solved = pin_boundary_layers(errors, boundary_layers)
        # The plot keeps every layer's measured errors, and shows the pinned layers' raw pick at no error.
        errors = [
            table if pinned is table else {**table, **pinned} for table, pinned in zip(errors, solved, strict=True)
        ]
        provenance["boundary_layers"] = boundary_layers
    layer_bits, total = solve_budget(solved, budget)
    uniform = {
        f"{b:g}": _round(sum(e[b, b] for e in errors if (b, b) in e)) for b in bits if b <= budget and b != RAW_BITS
    }
    schedule = BitSchedule(
        name=name,
        model=model,
        layer_bits=layer_bits,
        variant=variant,
        budget=budget,
        method=f"tune_schedule: exact knapsack over per-layer (k_bits, v_bits) minimising {METRICS[metric]}, "
        "measured on calibration text, with average bits <= budget",
        tuning={
            "command": command,
            "calibration": _display(calib),
            "tokens": sum(len(w) for w in windows),
            "window": window,
            "candidates": list(bits),
            **quantization,
            "metric": metric,
            **provenance,
            "total_error": _round(total),
            "uniform_total_error": uniform,
            "layer_error": [_round(errors[i][pair]) for i, pair in enumerate(layer_bits)],
        },
    )
    schedule.save(out)
    if plot:
        plot_sensitivity(errors, schedule, out.with_suffix(".png"), [b for b in bits if b != RAW_BITS], metric)
    return schedule


def main(argv: Sequence[str] | None = None) -> BitSchedule:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.tune_schedule", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--budget", type=float, required=True, help="average bits per K/V coordinate, e.g. 3.0")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIBRATION, help="calibration text file")
    parser.add_argument("--out", type=Path, help="schedule YAML (default configs/schedules/<name>.yaml)")
    parser.add_argument("--name", help="schedule name (default: the --out file stem, else <model>-<budget>)")
    parser.add_argument(
        "--bits", type=float, nargs="+", default=list(SCHEDULE_BITS), help="candidate bits for K and for V"
    )
    parser.add_argument("--variant", choices=("mse", "prod"), default="mse")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed (use the server's --seed)")
    parser.add_argument("--rotation", default="qr", help="rotation kind (qr or hadamard)")
    parser.add_argument("--norm-correction", action="store_true")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per calibration window")
    parser.add_argument("--max-tokens", type=int, help="use at most this many calibration tokens")
    parser.add_argument(
        "--metric",
        choices=tuple(METRICS),
        default="logits",
        help="logits (default): each layer's relative attention-output error weighted by its measured effect on the "
        "final logits (L more forward passes per window); attention: the relative errors, every layer alike",
    )
    parser.add_argument(
        "--boundary-layers",
        type=int,
        default=0,
        help="keep the first and last N layers raw (16-bit K and V) and tune the others within the budget "
        "(the budget counts the raw layers at 16 bits)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = parser.parse_args(argv)
    supported = PROD_BITS if args.variant == "prod" else SCHEDULE_BITS
    bad = [b for b in args.bits if b not in supported]
    if bad:
        parser.error(f"unsupported --bits {bad} for variant {args.variant}: supported values are {supported}")
    bits = sorted({int(b) if b == int(b) else b for b in args.bits})
    if args.budget < min(bits):
        parser.error(f"--budget {args.budget:g} is below the smallest candidate bits {min(bits):g}")
    schedule = tune(
        args.model,
        args.budget,
        calib=args.calib,
        out=args.out,
        name=args.name,
        bits=bits,
        variant=args.variant,
        seed=args.seed,
        rotation=args.rotation,
        norm_correction=args.norm_correction,
        window=args.window,
        max_tokens=args.max_tokens,
        metric=args.metric,
        boundary_layers=args.boundary_layers,
        plot=not args.no_plot,
        command=shlex.join(["python", "-m", "tq_serve.tune_schedule", *(sys.argv[1:] if argv is None else argv)]),
    )
    print(schedule.to_yaml())
    return schedule


if __name__ == "__main__":
    main()
