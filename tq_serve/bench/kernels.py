"""The Triton kernels' cost: `python -m tq_serve.bench kernels --static` (no GPU) or on a GPU (timed).

    --static    compile each kernel for sm_90a and count registers, spills, shared memory and the loop body's SASS
                instructions per token-head against the bandwidth budget (static_budget.py); any machine
    (default)   the timed stages of the GPU check (gpu.py): decode, extend and write against bf16 peers, and a whole
                decode step at Llama-3.1-8B shapes; `--dry-run` runs them at tiny sizes under the interpreter

The whole GPU check (correctness first, the autotune, every figure) is `python -m tq_serve.bench gpu`.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if "--static" in argv:
        from . import static_budget

        return static_budget.main(argv)
    from . import gpu

    if "--stages" in argv:
        return gpu.main(argv)
    return gpu.main([*argv, "--stages", "decode", "extend", "write", "step"])
