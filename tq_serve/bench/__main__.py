"""Dispatch `python -m tq_serve.bench NAME ...` to tq_serve.bench.NAME.main(argv).

Imported lazily so that `kernels` runs on a bare GPU box with torch and Triton only (no pydantic, no SGLang)."""

import importlib
import sys

BENCHMARKS = {
    "distortion": "quantizer distortion D_mse / D_prod against the paper's values (CPU)",
    "kernels": "Triton kernels: --static counts registers/spills/SASS for sm_90a (no GPU); timed on a CUDA GPU",
    "gpu": "the whole GPU check: correctness, decode/extend/write vs bf16, autotune, 8B decode step (CUDA GPU)",
    "capacity": "KV-cache token capacity, bf16 vs TurboQuant, as SGLang computes it",
    "quality": "perplexity and greedy agreement of the bundled model through the serving path",
    "serve": "output tokens/s, TurboQuant vs SGLang's bf16 backend",
    "cpu-attention": "one layer's decode/extend attention on a CPU, the C++ kernel vs bf16 SDPA",
    "capacity-win": "prefix-cache hit rate and TTFT at equal KV memory, TurboQuant vs bf16 (sessions workload)",
    "boundary-layers": "next-token KL with the first/last N layers raw vs uniform bits (offline, CPU)",
    "architectures": "tiny Llama/Qwen/Mistral/Gemma/Phi stand-ins: 16-bit exactness, 4/3-bit KL, capacity (CPU)",
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
