"""Start SGLang's OpenAI-compatible HTTP server for a resolved `ServeConfig`.

TurboQuant runs as SGLang's attention backend `turboquant` (tq_serve.sglang_plugin, loaded by SGLang through the
`sglang.srt.plugins` entry point in every process). Its config, `cfg.kv_cache`, travels serialised in one
environment variable (`sglang_environment`) that SGLang's processes inherit. A config without one (`--kv-cache
bf16`) runs plain SGLang with a bf16 KV cache: the baseline the benchmarks compare against.
"""

from __future__ import annotations

import os
import socket
import sys

from tq_serve.kv_config import ENV_VAR
from tq_serve.settings import ServeConfig
from tq_serve.sglang_plugin.compat import IncompatibleSGLangError, check_sglang_version
from tq_serve.sglang_plugin.config import BACKEND_NAME

# SGLang's own bf16 attention per device: torch_native is its portable CPU path (intel_amx needs sgl_kernel's CPU
# build); on CUDA, None lets SGLang pick its default (flashinfer / fa3 / triton by GPU).
BF16_BACKENDS = {"cpu": "torch_native", "cuda": None}
LONGER_CONTEXT_VAR = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"


class PreflightError(RuntimeError):
    """This machine cannot start the server (SGLang version, port); the CLI prints the message alone."""


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, port), family=family).close()
    except OSError as err:
        raise PreflightError(
            f"cannot listen on {host}:{port} ({err.strerror}): another server is using the port? pick one with --port"
        ) from None


def preflight(cfg: ServeConfig) -> None:
    """The checks that are cheap before SGLang's ~30 s start: fail fast, with one message.

    The version check is the plug-in's own (compat.py), so the CLI and every SGLang process apply one policy; the
    plain-SGLang baseline is held to it too, since the benchmarks compare the two on one SGLang. The hooked-name
    check needs sglang imported, which must wait for the CPU set-up: register() runs it in `launch`."""
    try:
        check_sglang_version()
    except IncompatibleSGLangError as err:
        raise PreflightError(str(err)) from None
    check_port_free(cfg.host, cfg.port)


def sglang_environment(cfg: ServeConfig) -> dict[str, str | None]:
    """The TurboQuant entries of the environment SGLang's processes start with (None: the variable is removed).

    The plug-in's register() reads exactly this in each process (TurboQuantConfig.from_env); `--dry-run` prints it.
    """
    return {ENV_VAR: None} if cfg.kv_cache is None else cfg.kv_cache.to_env()


def attention_backend(cfg: ServeConfig) -> str | None:
    return BACKEND_NAME if cfg.kv_cache is not None else BF16_BACKENDS[cfg.device]


def sglang_overrides(cfg: ServeConfig) -> dict:
    """The pass-through SGLang arguments as ServerArgs keywords, checked (tq_serve.sglang_args; imports sglang when
    there are any). A ValueError names a bad one."""
    from tq_serve.sglang_args import parse_sglang_args

    if cfg.sglang_args and cfg.device == "cpu":
        from tq_serve.cpu_support import apply_cpu_support

        apply_cpu_support()  # before anything imports sglang
    return parse_sglang_args(cfg.sglang_args, turboquant=cfg.kv_cache is not None)


def server_args(cfg: ServeConfig, overrides: dict | None = None):
    """SGLang's ServerArgs for this config (imports sglang: call after `prepare_environment`).

    With the TurboQuant cache, SGLang's hybrid sliding-window pool (a second, SWA-only pool that some models get) is
    turned off: the packed pool is one full pool of every layer, whose capacity the plug-in computes from the layout,
    and sliding-window layers read their window from it (docs/ARCHITECTURE.md section 4)."""
    from sglang.srt.server_args import ServerArgs

    overrides = sglang_overrides(cfg) if overrides is None else overrides
    optional = {
        "context_length": cfg.context_length,
        "chunked_prefill_size": cfg.chunked_prefill_size,
    }
    if cfg.kv_cache is not None:
        optional["disable_hybrid_swa_memory"] = True
    return ServerArgs(
        **overrides,
        **{k: v for k, v in optional.items() if v is not None},
        tp_size=cfg.tp_size,
        model_path=str(cfg.model.path),
        served_model_name=cfg.served_model_name,
        host=cfg.host,
        port=cfg.port,
        api_key=cfg.api_key,
        device=cfg.device,
        attention_backend=attention_backend(cfg),
        max_total_tokens=cfg.max_total_tokens,
        mem_fraction_static=cfg.mem_fraction_static,
        max_running_requests=cfg.max_running_requests,
        log_level=cfg.log_level,
        enable_metrics=cfg.enable_metrics,
        # usage.prompt_tokens_details.cached_tokens: radix-cache hits, which clients and the load test can see.
        enable_cache_report=True,
    )


def prepare_environment(cfg: ServeConfig) -> None:
    """Set what SGLang and its subprocesses read at start-up: the CPU engine, the plug-in's config."""
    if cfg.device == "cpu":
        from tq_serve.cpu_support import apply_cpu_support

        apply_cpu_support()
    if cfg.context_override:
        # SGLang refuses a context above the model's config unless this is set (ModelConfig._derive_context_length).
        os.environ[LONGER_CONTEXT_VAR] = "1"
        print(
            f"tq_serve: warning: --context-length {cfg.context_length} exceeds the {cfg.model.context_length} tokens "
            f"of {cfg.model.name}'s config: positions beyond it were never trained, so output quality there is not "
            f"known ({LONGER_CONTEXT_VAR}=1 is set for SGLang)",
            file=sys.stderr,
            flush=True,
        )
    for name, value in sglang_environment(cfg).items():
        if value is None:
            os.environ.pop(name, None)  # a stale config in the caller's environment must not reach SGLang
        else:
            os.environ[name] = value


def launch(cfg: ServeConfig, overrides: dict | None = None) -> None:
    """Run the server in this process until it is stopped (SGLang's scheduler runs in child processes).

    `overrides`: the pass-through arguments as checked by `sglang_overrides` (checked here when None)."""
    prepare_environment(cfg)
    from sglang.launch_server import run_server
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.plugins import load_plugins
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    if cfg.kv_cache is not None and BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        raise PreflightError(
            f"the TurboQuant plug-in did not register attention backend {BACKEND_NAME!r} (see the log above)"
        )
    check_model_names(cfg)
    try:
        run_server(server_args(cfg, overrides))
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def check_model_names(cfg: ServeConfig) -> None:
    """Answer 404 to OpenAI requests that name another model (SGLang would serve them with this one)."""
    from sglang.srt.entrypoints.http_server import app

    from tq_serve.model_name_check import ModelNameCheck

    app.add_middleware(ModelNameCheck, served_model_name=cfg.served_model_name)
