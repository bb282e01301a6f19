"""`python -m tq_serve --help`: an OpenAI-compatible server on 127.0.0.1 with a TurboQuant KV cache.

Every check that can fail on the user's input runs here, before SGLang starts, and ends with one line on stderr.
"""

from __future__ import annotations

import json
import sys

from pydantic import ValidationError

from tq_serve.settings import load_settings, resolve

EXIT_BAD_INPUT = 2
EXIT_CANNOT_START = 1


def _describe(err: ValidationError) -> str:
    def one(e: dict) -> str:
        flag = "--" + "-".join(str(part) for part in e["loc"]).replace("_", "-")
        return f"{flag}: {e['msg']} (got {e['input']!r})" if e["type"] != "extra_forbidden" else f"unknown {flag}"

    return "; ".join(one(e) for e in err.errors())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
        cfg = resolve(settings)
    except ValidationError as err:
        print(f"tq_serve: error: {_describe(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:
        print(f"tq_serve: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from tq_serve import server  # imports torch (via the plug-in's config): not needed for --help or bad input

    try:
        overrides = server.sglang_overrides(cfg)  # SGLang's own parser, only when there are pass-through arguments
    except ValueError as err:
        print(f"tq_serve: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = cfg.summary() | {"attention_backend": server.attention_backend(cfg)}
    if settings.dry_run:
        # The environment entries too: exactly what SGLang's processes would inherit, and the plug-in deserialise.
        lines = summary | {"sglang_environment": server.sglang_environment(cfg)}
        if overrides:
            lines["sglang_server_args"] = overrides  # the pass-through arguments as SGLang parsed them
        print("\n".join(f"{key}: {json.dumps(value, default=str)}" for key, value in lines.items()))
        return 0
    try:
        server.preflight(cfg)
    except server.PreflightError as err:
        print(f"tq_serve: error: {err}", file=sys.stderr)
        return EXIT_CANNOT_START
    if settings.deploys_on_ray:
        from tq_serve.deploy import serve_replicas

        return serve_replicas(settings, cfg)
    print(f"tq_serve: starting {json.dumps(summary)}", file=sys.stderr, flush=True)
    try:
        server.launch(cfg, overrides)
    except server.PreflightError as err:
        print(f"tq_serve: error: {err}", file=sys.stderr)
        return EXIT_CANNOT_START
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
