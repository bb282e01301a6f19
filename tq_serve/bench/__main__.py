"""Dispatch `python -m tq_serve.bench NAME ...` to tq_serve.bench.NAME.main(argv).

Imported lazily so that `kernels` runs on a bare GPU box with torch and Triton only (no pydantic, no SGLang)."""

import importlib
import sys

BENCHMARKS = {
    "distortion": "quantizer distortion D_mse / D_prod against the paper's values (CPU)",
    "kernels": "Triton decode/write kernels vs bf16 attention (CUDA GPU)",
    "capacity": "KV-cache token capacity, bf16 vs TurboQuant, as SGLang computes it",
    "quality": "perplexity and greedy agreement of the bundled model through the serving path",
    "serve": "output tokens/s, TurboQuant vs SGLang's bf16 backend",
    "capacity-win": "prefix-cache hit rate and TTFT at equal KV memory, TurboQuant vs bf16 (sessions workload)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python -m tq_serve.bench NAME [options]   (NAME --help for its options)\n")
        for name, what in BENCHMARKS.items():
            print(f"  {name:<13} {what}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = importlib.import_module(f"tq_serve.bench.{argv[0].replace('-', '_')}")
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
