"""The CPU set-up reaches SGLang's child processes: spawned ones (scheduler) and plain subprocesses alike."""

import os
import subprocess
import sys
import textwrap

from tq_serve.cpu_support import SHIM_DIR, cpu_environment

PROBE = textwrap.dedent(
    """
    import multiprocessing as mp, os, sys

    def probe(queue):
        import sgl_kernel
        from sgl_kernel import copy_all_layer_kv_cache_cpu  # a name SGLang's CPU path imports at module level
        queue.put((sgl_kernel.__file__, os.environ["SGLANG_USE_CPU_ENGINE"]))

    if __name__ == "__main__":
        from tq_serve.cpu_support import apply_cpu_support
        apply_cpu_support()
        ctx = mp.get_context("spawn")  # as SGLang starts its scheduler and detokenizer
        queue = ctx.Queue()
        child = ctx.Process(target=probe, args=(queue,))
        child.start()
        print(*queue.get(timeout=120))
        child.join()
    """
)


def test_environment_prepends_the_shim_and_keeps_pythonpath():
    env = cpu_environment({"PYTHONPATH": "/a:/b"})
    assert env == {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": os.pathsep.join([str(SHIM_DIR), "/a", "/b"])}
    assert cpu_environment(env)["PYTHONPATH"] == env["PYTHONPATH"]


def test_plain_subprocess_imports_the_shim():
    env = os.environ | cpu_environment(os.environ)
    code = "import sgl_kernel; print(sgl_kernel.__file__)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(SHIM_DIR / "sgl_kernel" / "__init__.py"), done.stderr


def test_spawned_child_imports_the_shim(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py")], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(SHIM_DIR / "sgl_kernel" / "__init__.py"), "1"]


def test_shim_functions_fail_loudly_if_called():
    env = os.environ | cpu_environment(os.environ)
    code = "from sgl_kernel import rmsnorm; rmsnorm()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "sgl_kernel.rmsnorm was called, but tq_serve runs SGLang on a CPU" in done.stderr
