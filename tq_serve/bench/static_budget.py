"""What the Triton kernels cost on Hopper, counted without a GPU: `python -m tq_serve.bench kernels --static`.

Each kernel is compiled for sm_90a exactly as its launcher would launch it (the launcher runs on small CPU tensors
and its launch is recorded instead of executed; Triton's own binder specializes the arguments as at run time, so
16-byte alignment and divisibility are the same), then the bundled CUDA tools read the result:

- registers, stack and spill bytes: `ptxas -v` on the kernel's PTX (what Triton's own ptxas call reports);
- SASS: `nvdisasm` of the cubin; the main loop is the backward branch that spans the most instructions (for
  decode and extend, the loop over key tiles), and its instructions are counted by kind (global/shared loads,
  tensor-core ops, spills, ...).

Decode is held against the bandwidth budget: streaming a token-head's bytes (K and V code rows, norms, the 4-byte
slot index) at the copy rate leaves the SMs `sms * schedulers * clock * bytes / bandwidth` warp-instructions for
it (H200: 132 SMs x 4 issue slots x 1.98 GHz, ~4.3 TB/s copy: about 33 at d=128, 4 bits). The loop body runs once per
warp per tile of BLOCK_N keys, so its cost per token-head is body x num_warps / BLOCK_N. This is a static count: it
ignores latency, L1 and shared-memory bank conflicts, and branches skipped at run time; a GPU run
(`python -m tq_serve.bench gpu`) measures the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tq_serve.autotune.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "results" / "static"


@dataclass(frozen=True)
class Hopper:
    """The issue and copy rates a kernel's instruction count is held against (H200 SXM)."""

    name: str = "H200"
    sms: int = 132
    schedulers: int = 4  # warp-instructions issued per SM per cycle
    clock_hz: float = 1.98e9
    copy_bytes_per_s: float = 4.3e12  # device-to-device copy, read + write, as measured by bench gpu

    def warp_instructions_for(self, nbytes: float) -> float:
        """Warp-instructions the whole GPU issues in the time its HBM streams `nbytes`."""
        return self.sms * self.schedulers * self.clock_hz * nbytes / self.copy_bytes_per_s


H200 = Hopper()
INDEX_BYTES = 4  # one int32 slot index per token (SGLang's kv_indices)


# ------------------------------------------------------------------------------------------- recording and compiling


@dataclass
class Launch:
    """One recorded kernel launch: the JIT function, its arguments and keyword arguments."""

    fn: object
    args: tuple
    kwargs: dict


@contextmanager
def recorded_launches(modules_and_kernels: list[tuple[object, str]]):
    """Replace `module.name` kernels by recorders for the duration; yields the list the launches land in."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.fn, args, kwargs))

    saved = [(m, n, getattr(m, n)) for m, n in modules_and_kernels]
    try:
        for module, name, fn in saved:
            setattr(module, name, Recorder(fn))
        yield launches
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def compile_sm90(launch: Launch):
    """Compile a recorded launch for sm_90a (no GPU needed), specialized as Triton's runtime would specialize it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: this Triton wheel ships no {name} (an NVIDIA backend is needed)")
    return str(path)


def ptxas_usage(ptx: str) -> dict:
    """Registers, stack frame and spill bytes that ptxas reports for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [_tool("ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "kernel.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = proc.stdout + proc.stderr

    def number(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "stack_bytes": number(r"(\d+) bytes stack frame"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"),
        "spill_load_bytes": number(r"(\d+) bytes spill loads"),
    }


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    target: str | None  # branch target label


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> tuple[list[Instruction], dict[str, int]]:
    """SASS instructions of a cubin's kernel and the address of each label."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        match = _INSTR.search(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        target = _TARGET.search(match.group(3))
        instructions.append(Instruction(address, match.group(2), target.group(1) if target else None))
    return instructions, labels


def main_loop(instructions: list[Instruction], labels: dict[str, int]) -> list[Instruction]:
    """The instructions of the backward branch that spans the most instructions (empty when there is no loop)."""
    best: list[Instruction] = []
    for i, ins in enumerate(instructions):
        if ins.opcode.startswith("BRA") and ins.target in labels and labels[ins.target] <= ins.address:
            body = [x for x in instructions[: i + 1] if x.address >= labels[ins.target]]
            if len(body) > len(best):
                best = body
    return best


KINDS = {
    "global_load": ("LDG",),
    "global_store": ("STG",),
    "async_copy": ("LDGSTS", "UBLKCP", "UTMALDG"),
    "shared_load": ("LDS", "LDSM"),
    "shared_store": ("STS", "STSM"),
    "tensor_core": ("HMMA", "HGMMA", "IMMA", "QGMMA", "WARPGROUP"),
    "spill": ("LDL", "STL"),
    "shuffle": ("SHFL",),
    "barrier": ("BAR", "SYNCS"),
    "convert": ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP"),
    "integer": ("IMAD", "IADD3", "LOP3", "SHF", "LEA", "PRMT", "ISETP", "SEL", "IABS", "VIADD", "IMNMX", "VIMNMX"),
    "float": ("FFMA", "FMUL", "FADD", "FSETP", "FMNMX", "MUFU", "FSEL", "HFMA2", "HMUL2", "HADD2", "FCHK"),
}


def kind_of(opcode: str) -> str:
    base = opcode.split(".")[0]
    for kind, bases in KINDS.items():
        if base in bases:
            return kind
    return "other"


def sass_summary(instructions: list[Instruction]) -> dict:
    counts = Counter(kind_of(i.opcode) for i in instructions if not i.opcode.startswith("NOP"))
    loads = Counter(i.opcode for i in instructions if i.opcode.split(".")[0] in ("LDG", "LDS", "LDSM", "LDGSTS"))
    return {
        "instructions": sum(counts.values()),
        "by_kind": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "loads": dict(sorted(loads.items(), key=lambda kv: -kv[1])),
    }


def analyse(launch: Launch) -> dict:
    """Compile one launch and count its resources and SASS."""
    kernel = compile_sm90(launch)
    instructions, labels = disassemble(kernel.asm["cubin"])
    loop = main_loop(instructions, labels)
    constexprs = {k: v for k, v in launch.kwargs.items() if k.isupper() and isinstance(v, (int, bool, str))}
    return {
        "kernel": launch.fn.__name__,
        "num_warps": launch.kwargs.get("num_warps", 4),
        "num_stages": launch.kwargs.get("num_stages", 3),
        "constexprs": constexprs,
        "shared_bytes": kernel.metadata.shared,
        **ptxas_usage(kernel.asm["ptx"]),
        "kernel_sass": sass_summary(instructions),
        "loop_sass": sass_summary(loop),
    }


# ----------------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One kernel at one shape and its default launch config (the launcher's own defaults, as serving calls it)."""

    kernel: str  # decode | extend | write
    head_dim: int = 128
    bits: float = 4
    variant: str = "mse"
    group: int = 4

    @property
    def name(self) -> str:
        bits = f"{self.bits:g}"
        return f"{self.kernel}-d{self.head_dim}-b{bits}-{self.variant}-g{self.group}"


HEADLINE = Case("decode")
DEFAULT_CASES = (
    HEADLINE,
    Case("decode", bits=3),
    Case("decode", bits=2),
    Case("decode", bits=4, variant="prod"),
    Case("extend"),
    Case("write", group=1),
    Case("write", bits=3, group=1),
)


def _launch_case(case: Case, config: dict) -> Launch:
    """Run the case's launcher (with launch keywords `config`) on tiny CPU tensors; the launch of its main kernel."""
    import torch

    from tq_serve.kernels import triton_decode, triton_extend, triton_write
    from tq_serve.kernels.layout import VectorLayout
    from tq_serve.kernels.packed import PackedVectors
    from tq_serve.kernels.quantizer import get_quantizer

    qz = get_quantizer(VectorLayout(head_dim=case.head_dim, bits=case.bits, variant=case.variant))
    kv_heads, slots, d = 2, 64, case.head_dim
    k_pool = PackedVectors.empty(qz.layout, (slots, kv_heads))
    v_pool = PackedVectors.empty(qz.layout, (slots, kv_heads))
    kernels = [
        (triton_decode, "_decode_split_kernel"),
        (triton_decode, "_decode_reduce_kernel"),
        (triton_extend, "_extend_kernel"),
        (triton_write, "_write_kv_kernel"),
    ]
    with recorded_launches(kernels) as launches:
        if case.kernel == "write":
            x = torch.randn(3, kv_heads, d, dtype=torch.bfloat16)
            triton_write.write_kv_triton(k_pool, v_pool, x, x, torch.arange(3), qz, qz, **config)
        elif case.kernel == "decode":
            q = torch.randn(2, kv_heads * case.group, d, dtype=torch.bfloat16)
            kv_indptr = torch.tensor([0, 30, 60], dtype=torch.int32)
            triton_decode.decode_attention_triton(
                q, k_pool, v_pool, kv_indptr, torch.arange(60, dtype=torch.int32), qz, qz, d**-0.5, **config
            )
        else:
            q = torch.randn(4, kv_heads * case.group, d, dtype=torch.bfloat16)
            qo_indptr, kv_indptr = torch.tensor([0, 2, 4]), torch.tensor([0, 30, 60])
            triton_extend.extend_attention_triton(
                q, k_pool, v_pool, qo_indptr, kv_indptr, torch.arange(60), qz, qz, d**-0.5, **config
            )
    main_kernel = {"decode": "_decode_split_kernel", "extend": "_extend_kernel", "write": "_write_kv_kernel"}
    return next(x for x in launches if x.fn.__name__ == main_kernel[case.kernel])


def _per_token_head(case: Case, report: dict, layout) -> dict:
    """The loop's cost per token-head against what streaming that token-head's bytes leaves."""
    warps, body = report["num_warps"], report["loop_sass"]["instructions"]
    nbytes = 2 * layout.bytes_per_vector + INDEX_BYTES
    if case.kernel == "write":
        # No loop over tokens: the kernel runs once per BLOCK_M rows (vectors), reading bf16 K and V; its main loop
        # (the rotation, over BLOCK_K-wide chunks of head_dim) runs D_PAD / BLOCK_K times.
        c = report["constexprs"]
        trips = c["D_PAD"] // c["BLOCK_K"]
        total = report["kernel_sass"]["instructions"] + body * (trips - 1)
        per = total * warps / c["BLOCK_M"]
        nbytes = 2 * (2 * case.head_dim + layout.bytes_per_vector) + INDEX_BYTES
        unit = "row (K and V of one token-head), rotation loop counted D_PAD / BLOCK_K times"
    elif case.kernel == "extend":
        # A program attends BLOCK_M query rows (tokens x GQA heads) to each key tile it reads.
        per = body * warps / report["constexprs"]["BLOCK_N"]
        unit = f"key-head per program of {report['constexprs']['BLOCK_M']} query rows"
    else:
        per = body * warps / report["constexprs"]["BLOCK_N"]
        unit = "token-head (per program: one KV head, its GQA group)"
    budget = H200.warp_instructions_for(nbytes)
    return {
        "unit": unit,
        "bytes": nbytes,
        "warp_instructions": per,
        "budget": budget,
        "over_budget": per / budget,
    }


def run_cases(
    cases: tuple[Case, ...], config: dict | None = None, progress: Callable[[str], None] = print
) -> list[dict]:
    """Compile and count each case, at the launchers' defaults overridden by `config` (launch keywords)."""
    from tq_serve.kernels.layout import VectorLayout

    rows = []
    for case in cases:
        progress(f"compiling {case.name} for sm_90a ...")
        report = analyse(_launch_case(case, config or {}))
        layout = VectorLayout(head_dim=case.head_dim, bits=case.bits, variant=case.variant)
        rows.append({"case": case.name, **report, "per_token_head": _per_token_head(case, report, layout)})
    return rows


def _environment() -> dict:
    import torch
    import triton

    return {"triton": triton.__version__, "torch": torch.__version__, "git_commit": git_commit(), "target": "sm_90a"}


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'case':<26} {'regs':>4} {'spill B':>7} {'smem KiB':>8} {'loop instr':>10} {'per tok-head':>12} "
        f"{'budget':>6} {'x budget':>8}  loop loads"
    )
    print(head)
    for r in rows:
        p = r["per_token_head"]
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        loads = ", ".join(f"{n} {op}" for op, n in r["loop_sass"]["loads"].items()) or "-"
        print(
            f"{r['case']:<26} {r['registers']:>4} {spill:>7} {r['shared_bytes'] / 1024:>8.1f} "
            f"{r['loop_sass']['instructions']:>10} {p['warp_instructions']:>12.1f} {p['budget']:>6.1f} "
            f"{p['over_budget']:>8.2f}  {loads}"
        )
    print(
        f"\nbudget: warp-instructions an {H200.name} issues while streaming one unit's bytes at "
        f"{H200.copy_bytes_per_s / 1e12:.1f} TB/s ({H200.sms} SMs x {H200.schedulers} x {H200.clock_hz / 1e9:.2f} GHz)"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tq_serve.bench kernels --static", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cases", nargs="+", default=[c.name for c in DEFAULT_CASES], help="kernel-d<dim>-b<bits>-<variant>-g<group>"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON report (default: results/static/sm90a__triton-V.json)"
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument(
        "--config", nargs="*", default=[], metavar="KEY=VALUE", help="launch keywords, e.g. block_n=64 num_stages=2"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Under the interpreter @triton.jit yields interpreted functions, which cannot be compiled: start afresh.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "tq_serve.bench", "kernels", *argv, *([] if "--static" in argv else ["--static"])]
        return subprocess.run(cmd, env=env, cwd=REPO_ROOT).returncode
    try:
        cases = tuple(parse_case(name) for name in args.cases)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import triton

    config = {k: int(v) if v.isdigit() else v for k, v in (item.split("=", 1) for item in args.config)}
    rows = run_cases(cases, config, progress=lambda line: print(line, file=sys.stderr))
    report = {
        "benchmark": "kernels --static",
        "environment": _environment(),
        "gpu_model": vars(H200),
        "config": config,
        "rows": rows,
    }
    out = args.out or DEFAULT_OUT_DIR / f"sm90a__triton-{triton.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(rows)
        print(f"wrote {out}")
    return 0


def parse_case(name: str) -> Case:
    """`decode-d128-b4-mse-g4` -> Case."""
    match = re.fullmatch(r"(decode|extend|write)-d(\d+)-b([\d.]+)-(mse|prod)-g(\d+)", name)
    if not match:
        raise ValueError(
            f"bad case {name!r}: expected kernel-d<dim>-b<bits>-<variant>-g<group>, e.g. decode-d128-b4-mse-g4"
        )
    kernel, d, bits, variant, group = match.groups()
    bits_value = float(bits)
    return Case(kernel, int(d), int(bits_value) if bits_value.is_integer() else bits_value, variant, int(group))
