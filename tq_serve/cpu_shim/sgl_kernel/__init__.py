"""Stand-in for `sgl_kernel` on a machine without a GPU (put on the path by tq_serve/cpu_support.py).

The real wheel loads CUDA libraries at import and fails without libcuda. SGLang's CPU engine imports names from it
at module level (`from sgl_kernel import copy_all_layer_kv_cache_cpu`) but calls none of them unless the Intel AMX
backend is active, which SGLang detects by looking for `torch.ops.sgl_kernel.convert_weight_packed`: no op is
registered here, so AMX stays off. Every name imports as a function that raises if it is ever called."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def kernel(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} was called, but tq_serve runs SGLang on a CPU without sgl_kernel")

    kernel.__name__ = kernel.__qualname__ = name
    return kernel
