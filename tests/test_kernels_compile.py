"""The Triton kernels pass the real compiler for a Hopper GPU (sm_90), on a machine without one.

The interpreter accepts programs the compiler rejects (shapes that are not constexpr, layouts the backend cannot
lower, shared memory beyond the GPU's), so on CPU-only CI this compiles each kernel to a cubin with Triton's bundled
ptxas, in a subprocess without TRITON_INTERPRET, and checks the default launch configs fit in 227 KiB of shared
memory. The launchers build the arguments as for a real launch; only the launch itself is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

SHARED_MEMORY_BYTES = 227 * 1024  # per block on H100/H200

_SCRIPT = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from tq_serve.kernels.layout import VectorLayout
from tq_serve.kernels.packed import PackedVectors
from tq_serve.kernels.quantizer import get_quantizer
from tq_serve.kernels import triton_decode, triton_extend, triton_write

POINTER = {torch.uint8: "*u8", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
           torch.int32: "*i32", torch.int64: "*i64"}
calls = []

class Recorder:
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

def compiled(fn, args, kwargs):
    names = fn.arg_names
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    signature, constexprs = {}, {}
    for name, param in zip(names, fn.params):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    kernel = triton_compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    return {"kernel": fn.__name__, "shared": kernel.metadata.shared}

for module, name in ((triton_write, "_write_kv_kernel"), (triton_decode, "_decode_split_kernel"),
                     (triton_decode, "_decode_reduce_kernel"), (triton_extend, "_extend_kernel")):
    setattr(module, name, Recorder(getattr(module, name)))

d, k_bits, k_variant, v_bits, v_variant, group = json.loads(sys.argv[1])
k_qz = get_quantizer(VectorLayout(head_dim=d, bits=k_bits, variant=k_variant))
v_qz = get_quantizer(VectorLayout(head_dim=d, bits=v_bits, variant=v_variant))
heads, slots = 2, 8
k_pool = PackedVectors.empty(k_qz.layout, (slots, heads))
v_pool = PackedVectors.empty(v_qz.layout, (slots, heads))
x = torch.randn(3, heads, d, dtype=torch.bfloat16)
triton_write.write_kv_triton(k_pool, v_pool, x, x, torch.arange(3), k_qz, v_qz)
q = torch.randn(2, heads * group, d, dtype=torch.bfloat16)
kv_indptr, kv_indices = torch.tensor([0, 3, 8], dtype=torch.int32), torch.arange(8, dtype=torch.int32)
triton_decode.decode_attention_triton(q, k_pool, v_pool, kv_indptr, kv_indices, k_qz, v_qz, 0.1, num_kv_splits=2)
triton_extend.extend_attention_triton(q.view(-1, heads * group, d)[:2], k_pool, v_pool, torch.tensor([0, 1, 2]),
                                      kv_indptr, kv_indices, k_qz, v_qz, 0.1)
print(json.dumps([compiled(*call) for call in calls]))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


# (head_dim, k_bits, k_variant, v_bits, v_variant, group), one case for CI time: a padded head_dim, K with QJL signs
# and a 3-bit code (2-bit + 1-bit planes), V with two segments (3 and 2 bits)
CASES = [(80, 4, "prod", 2.5, "mse", 4)]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests compile and run for real")
@pytest.mark.skipif(not _nvidia_backend(), reason="this Triton build has no NVIDIA backend")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "d{}-k{}{}-v{}{}-g{}".format(*c))
def test_kernels_compile_for_sm90(case, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(case)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k["kernel"] for k in kernels} == {
        "_write_kv_kernel",
        "_decode_split_kernel",
        "_decode_reduce_kernel",
        "_extend_kernel",
    }
    for k in kernels:
        assert k["shared"] <= SHARED_MEMORY_BYTES, f"{k['kernel']} needs {k['shared']} B of shared memory"
