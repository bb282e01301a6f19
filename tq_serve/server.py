"""Start SGLang's OpenAI-compatible HTTP server for a resolved `ServeConfig`.

TurboQuant runs as SGLang's attention backend `turboquant` (tq_serve.sglang_plugin, loaded by SGLang through the
`sglang.srt.plugins` entry point in every process); its frozen config travels in TQ_SGLANG_CONFIG. A config without
a KV layout (--kv-bits 16) runs plain SGLang with a bf16 KV cache: the baseline the benchmarks compare against.
"""

from __future__ import annotations

import os
import socket
from importlib.metadata import PackageNotFoundError, version

from tq_serve.settings import ServeConfig
from tq_serve.sglang_plugin.config import BACKEND_NAME, TurboQuantConfig

SUPPORTED_SGLANG = "0.5.23"
# SGLang's own bf16 attention per device: torch_native is its portable CPU path (intel_amx needs sgl_kernel's CPU
# build); on CUDA, None lets SGLang pick its default (flashinfer / fa3 / triton by GPU).
BF16_BACKENDS = {"cpu": "torch_native", "cuda": None}


class PreflightError(RuntimeError):
    """This machine cannot start the server (SGLang version, port); the CLI prints the message alone."""


def installed_sglang_version() -> str | None:
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version() -> None:
    installed = installed_sglang_version()
    if installed != SUPPORTED_SGLANG:
        found = f"SGLang {installed} is installed" if installed else "SGLang is not installed"
        raise PreflightError(
            f"{found}, but tq_serve supports SGLang {SUPPORTED_SGLANG} only (its plug-in hooks SGLang internals): "
            f"pip install sglang=={SUPPORTED_SGLANG}"
        )


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise PreflightError(
            f"cannot listen on {host}:{port} ({err.strerror}): another server is using the port? pick one with --port"
        ) from None


def preflight(cfg: ServeConfig) -> None:
    """The checks that are cheap before SGLang's ~30 s start: fail fast, with one message."""
    check_sglang_version()
    check_port_free(cfg.host, cfg.port)


def turboquant_config(cfg: ServeConfig) -> TurboQuantConfig:
    layout = cfg.kv_layout
    return TurboQuantConfig(
        kv_bits=None, layer_bits=layout.layer_bits, variant=layout.variant, norm_dtype=layout.norm_dtype, seed=cfg.seed
    )


def attention_backend(cfg: ServeConfig) -> str | None:
    return BACKEND_NAME if cfg.kv_layout is not None else BF16_BACKENDS[cfg.device]


def server_args(cfg: ServeConfig):
    """SGLang's ServerArgs for this config (imports sglang: call after `prepare_environment`)."""
    from sglang.srt.server_args import ServerArgs

    return ServerArgs(
        model_path=str(cfg.model.path),
        served_model_name=cfg.model.name,
        host=cfg.host,
        port=cfg.port,
        api_key=cfg.api_key,
        device=cfg.device,
        attention_backend=attention_backend(cfg),
        max_total_tokens=cfg.max_total_tokens,
        mem_fraction_static=cfg.mem_fraction_static,
        max_running_requests=cfg.max_running_requests,
        log_level=cfg.log_level,
        # usage.prompt_tokens_details.cached_tokens: radix-cache hits, which clients and the load test can see.
        enable_cache_report=True,
    )


def prepare_environment(cfg: ServeConfig) -> None:
    """Set what SGLang and its subprocesses read at start-up: the CPU engine, the plug-in's config."""
    if cfg.device == "cpu":
        from tq_serve.cpu_support import apply_cpu_support

        apply_cpu_support()
    if cfg.kv_layout is not None:
        os.environ.update(turboquant_config(cfg).to_env())


def launch(cfg: ServeConfig) -> None:
    """Run the server in this process until it is stopped (SGLang's scheduler runs in child processes)."""
    prepare_environment(cfg)
    from sglang.launch_server import run_server
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    if cfg.kv_layout is not None and BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        raise PreflightError(
            f"the TurboQuant plug-in did not register attention backend {BACKEND_NAME!r} (see the log above)"
        )
    try:
        run_server(server_args(cfg))
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
