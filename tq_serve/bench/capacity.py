"""KV-cache capacity, bf16 vs TurboQuant: `python -m tq_serve.bench capacity --model llama-3.1-8b --memory-gib 16`.

SGLang sizes its KV pool as  max_total_num_tokens = kv_memory_bytes // cell_size  (rounded down to whole pages;
DefaultPoolConfigurator.calculate_pool_sizes). For bf16, cell_size = layers * kv_heads * head_dim * 2 (K, V) * 2 B;
with `--attention-backend turboquant` the plug-in's capacity hook returns KVLayout.bytes_per_token instead. This
command evaluates that rule for a model, a memory budget and bit settings, without a GPU or the weights.

`--measure` also starts the server (bf16 and each setting) for a model that is on this machine with the same
--mem-fraction-static and reads the max_total_num_tokens SGLang actually chose (/server_info), next to the estimate.
On a CPU the budget follows free host memory, so measured runs differ a little; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

from tq_serve.bench.harness import BF16, KVSetting, kv_settings, model_flags, running_server, table, write_report
from tq_serve.kernels.layout import KVLayout
from tq_serve.registry import ModelNotFoundError, ModelRegistry, ModelShape

GIB = 1 << 30


def estimate(shape: ModelShape, setting: KVSetting, memory_bytes: int, page_size: int = 1) -> dict:
    """Bytes per token and max tokens as SGLang computes them for one setting."""
    layout = KVLayout.uniform(
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        bits=setting.bits,
        variant=setting.variant,
    )
    cell = layout.bf16_bytes_per_token if setting == BF16 else layout.bytes_per_token
    tokens = memory_bytes // cell // page_size * page_size
    return {
        "setting": setting.name,
        "bits": setting.bits,
        "variant": setting.variant,
        "bytes_per_token": cell,
        "max_tokens": tokens,
        "vs_bf16": layout.bf16_bytes_per_token / cell,
    }


def measured_max_tokens(model_args: list[str], setting: KVSetting, mem_fraction: float, log_dir: Path) -> int:
    flags = [*model_args, "--mem-fraction-static", str(mem_fraction), *setting.flags()]
    with running_server(flags, log_dir / f"capacity-{setting.name}.log") as url:
        info = httpx.get(f"{url}/server_info", timeout=60).json()
    return _find_key(info, "max_total_num_tokens")


def _find_key(data: object, key: str):
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.bench capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="alias from configs/models.yaml or a model directory")
    parser.add_argument("--model-path", type=Path, help="local weights for the alias")
    parser.add_argument("--memory-gib", type=float, nargs="+", default=[16.0], help="KV-cache memory budgets")
    parser.add_argument("--bits", nargs="+", default=["2", "2.5", "3", "3.5", "4"])
    parser.add_argument("--variants", nargs="+", default=["mse", "prod"], choices=["mse", "prod"])
    parser.add_argument("--page-size", type=int, default=1)
    parser.add_argument("--measure", action="store_true", help="also start the server and read SGLang's capacity")
    parser.add_argument("--mem-fraction-static", type=float, default=0.1, help="for --measure")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", type=Path, default=Path("bench-results/capacity.json"))
    args = parser.parse_args(argv)
    try:
        shape = ModelRegistry.load().shape(args.model, args.model_path)
        settings = kv_settings(args.bits, args.variants)
        rows = [
            {"memory_gib": gib, **estimate(shape, s, int(gib * GIB), args.page_size)}
            for gib in args.memory_gib
            for s in settings
        ]
    except (ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.measure:
        selected = model_flags(args.model, args.model_path)
        with tempfile.TemporaryDirectory() as logs:
            measured = {
                s.name: measured_max_tokens(selected, s, args.mem_fraction_static, Path(logs)) for s in settings
            }
        for row in rows:
            row["measured_max_tokens"] = measured[row["setting"]]
            row["measured_vs_bf16"] = measured[row["setting"]] / measured["bf16"]
    config = {"model": args.model, "shape": vars(shape), "page_size": args.page_size}
    if args.measure:
        config["mem_fraction_static"] = args.mem_fraction_static
    report = write_report(args.out, "capacity", config, rows)
    columns = {"memory_gib": "g", "setting": "", "bytes_per_token": ",d", "max_tokens": ",d", "vs_bf16": ".2f"}
    if args.measure:
        columns |= {"measured_max_tokens": ",d", "measured_vs_bf16": ".2f"}
    print(json.dumps(report, indent=1) if args.json else f"{args.model} {vars(shape)}\n{table(rows, columns)}")
    return 0
