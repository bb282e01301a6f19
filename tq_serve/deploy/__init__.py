"""`python -m tq_serve --replicas N`: N SGLang engines with the TurboQuant KV cache behind one OpenAI-compatible
endpoint, on Ray Serve. The only part of tq_serve that imports ray.

    app.py      the Serve application: ingress (API key, /health, /v1/*) and the engine replicas
    router.py   prefix-affinity request routing, power-of-two under load
    engine.py   one engine as a child process of a replica (`python -m tq_serve` on a loopback port)
    cluster.py  the `ray start` command of a cluster node, every Ray port pinned

`serve_replicas` starts a private local Ray (or joins `--ray-address`), deploys, and runs until SIGINT/SIGTERM, then
removes everything it started: the application (whose replicas stop their engines) and the local Ray.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tq_serve.settings import ServeConfig, ServeSettings

# Settings that belong to the deployment or that each engine gets its own value for.
NOT_FOR_ENGINES = frozenset(
    {
        "preset",
        "config",
        "host",
        "port",
        "api_key",
        "dry_run",
        "device",
        "model",
        "model_path",
        "replicas",
        "min_replicas",
        "max_replicas",
        "target_ongoing_requests",
        "max_ongoing_requests",
        "affinity_prefix_chars",
        "ray_address",
    }
)


def engine_flags(settings: ServeSettings, cfg: ServeConfig) -> list[str]:
    """The `python -m tq_serve` flags of one engine: every single-server setting, with paths made absolute (an
    engine runs in a Ray worker's directory) and the device as resolved here (it decides the replica's resources)."""
    model = ["--model", cfg.model.name, "--model-path", str(cfg.model.path)]
    if cfg.model.name not in _aliases():
        # A model given as a directory is its own name; pass it absolute.
        model = ["--model", str(cfg.model.path)]
    flags = [*model, "--device", cfg.device]
    # Metrics on in every engine, whatever the user asked of the endpoint: each replica reads its engine's KV-pool
    # gauges for the router (EngineReplica.record_routing_stats). The engines listen on loopback only.
    engine_settings = settings.model_dump(exclude=set(NOT_FOR_ENGINES)) | {"enable_metrics": True}
    for name, value in engine_settings.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            flags += [f"{flag}={item}" for item in value]  # with `=`: an item is itself a --flag
        else:
            flags += [flag, str(value.resolve() if isinstance(value, Path) else value)]
    return flags


def _aliases() -> set[str]:
    from tq_serve.registry import ModelRegistry

    return set(ModelRegistry.load().entries)


def serve_replicas(settings: ServeSettings, cfg: ServeConfig) -> int:
    """Deploy and serve until SIGINT/SIGTERM; the exit status of `python -m tq_serve`."""
    import ray
    from ray import serve

    from tq_serve.deploy.app import APP_NAME, build_app

    replicas = settings.replicas
    app = build_app(
        engine_flags(settings, cfg),
        device=cfg.device,
        replicas=replicas,
        min_replicas=settings.min_replicas or replicas,
        max_replicas=settings.max_replicas or replicas,
        target_ongoing_requests=settings.target_ongoing_requests,
        max_ongoing_requests=settings.max_ongoing_requests,
        affinity_prefix_chars=settings.affinity_prefix_chars,
        api_key=cfg.api_key,
    )
    local = settings.ray_address in (None, "local")
    try:
        if local:
            # Ray runs workers at nice 15 to keep its own daemons responsive; here the workers are the engines, the
            # node's main work, and they must not lose the CPU to anything else on the machine.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=settings.ray_address)
        # After ray.init, which installs its own SIGTERM handler in a driver.
        signal.signal(signal.SIGTERM, _interrupt)
        # One HTTP proxy, on the head node, at --host/--port: the one endpoint. Serve's default, one per node, would
        # also bind every other node's --host:--port (and collide on a machine that runs two nodes).
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(
            f"tq_serve: {replicas} replicas of {cfg.model.name} on Ray Serve at http://{cfg.host}:{cfg.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("tq_serve: shutting down", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as err:
        print(f"tq_serve: error: deployment failed: {err}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            # Deleting the application stops its replicas, and each replica stops its engine.
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
            ray.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM shuts down like Ctrl-C."""
    raise KeyboardInterrupt
