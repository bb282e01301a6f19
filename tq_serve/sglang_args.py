"""Pass-through SGLang server arguments (`--sglang-arg=--foo=bar`, or everything after `--`), checked at start-up.

They are parsed by SGLang's own parser (`ServerArgs.add_cli_args` on an argparse parser), so a typo or a bad value is
one clear error naming the argument (exit 2) before anything starts, not a crash in a scheduler subprocess. Then:

- the arguments tq_serve sets itself (model, host, port, attention backend, capacity, ...) are refused with the
  tq_serve flag to use instead, so that one setting has one source;
- combinations the TurboQuant backend does not support (speculative decoding, a KV-cache dtype) are refused with
  the reason (tq_serve.model_support), as when they come any other way.

What remains becomes keyword arguments of ServerArgs (tq_serve.server.server_args). Imports SGLang (and torch) only
when there is something to check.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from tq_serve.model_support import refusal, unsupported_option_reason

OWNED = {
    "model_path": "--model / --model-path",
    "tokenizer_path": "--model / --model-path",
    "served_model_name": "--served-model-name",
    "host": "--host",
    "port": "--port",
    "api_key": "--api-key",
    "device": "--device",
    "attention_backend": "--kv-cache",
    "prefill_attention_backend": "--kv-cache",
    "decode_attention_backend": "--kv-cache",
    "max_total_tokens": "--max-total-tokens",
    "mem_fraction_static": "--mem-fraction-static",
    "max_running_requests": "--max-running-requests",
    "context_length": "--context-length",
    "tp_size": "--tp-size",
    "chunked_prefill_size": "--chunked-prefill-size",
    "log_level": "--log-level",
    "enable_metrics": "--enable-metrics",
}
"""ServerArgs fields that tq_serve sets from its own flags -> the flag to use."""
TURBOQUANT_OWNED = {"kv_cache_dtype": "--kv-bits / --kv-schedule (TurboQuant sets the KV format itself)"}
"""Fields refused only with the TurboQuant cache (plain SGLang takes them)."""
_PLACEHOLDER_MODEL = "__tq_serve_placeholder_model__"


class SGLangArgumentError(ValueError):
    """A pass-through argument SGLang's parser refuses, or one tq_serve refuses; the message names it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2 from inside the parser
        raise SGLangArgumentError(message)


def _parser() -> _Parser:
    from sglang.srt.server_args import ServerArgs

    parser = _Parser(prog="sglang", add_help=False, allow_abbrev=False)
    ServerArgs.add_cli_args(parser)
    return parser


def parse_sglang_args(args: Sequence[str], *, turboquant: bool) -> dict[str, Any]:
    """The ServerArgs keyword arguments that `args` set (those that differ from SGLang's defaults).

    A ValueError (SGLangArgumentError) names an unknown argument, a bad value, an argument tq_serve owns or an
    option the TurboQuant backend refuses."""
    args = list(args)
    if not args:
        return {}
    flags = [a for a in args if a.startswith("-")]
    if not flags or not args[0].startswith("-"):
        raise SGLangArgumentError(f"SGLang server arguments must start with a --flag, got {args[0]!r}")
    if "--config" in args or any(a.startswith("--config=") for a in args):
        raise SGLangArgumentError("pass SGLang's options one by one: --config is tq_serve's own (a YAML of its keys)")
    parser = _parser()
    base = ["--model-path", _PLACEHOLDER_MODEL]
    try:
        defaults = vars(parser.parse_args(base))
        given, unknown = parser.parse_known_args([*base, *args])
    except SGLangArgumentError as err:
        raise SGLangArgumentError(f"SGLang server argument: {err}") from None
    if unknown:
        raise SGLangArgumentError(
            f"unknown SGLang server argument {' '.join(unknown)} (SGLang 0.5.23's `python -m sglang.launch_server "
            "--help` lists them)"
        )
    overrides = {k: v for k, v in vars(given).items() if k in defaults and v != defaults[k]}
    owned = {**OWNED, **(TURBOQUANT_OWNED if turboquant else {})}
    for name in overrides:
        if name in owned:
            raise SGLangArgumentError(
                f"SGLang server argument --{name.replace('_', '-')} "
                f"is set by tq_serve: use tq_serve's own {owned[name]}"
            )
    if turboquant:
        reason = unsupported_option_reason(overrides)
        if reason is not None:
            raise SGLangArgumentError(refusal(reason))
    return overrides
