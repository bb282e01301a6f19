"""`ray start` for a tq_serve cluster node: every port Ray opens pinned, the node's address given, no dashboard.

    python -m tq_serve.deploy.cluster --node-ip 10.0.0.1 --head            # prints the head's `ray start`
    python -m tq_serve.deploy.cluster --node-ip 10.0.0.2 --address 10.0.0.1:6379

A node advertises --node-ip-address to the cluster. Ray 2.60 has no flag that binds its servers to it: measured on
this machine, the GCS and the raylet listen on all interfaces (::) and the autoscaler's and dashboard's metrics
servers on 0.0.0.0:44217 and 0.0.0.0:44227, whatever --node-ip-address says. So the ports are pinned instead: the
exposed set is known, and one firewall rule per node (allow them from the cluster's nodes only) closes it. The
dashboard is off: tq_serve does not need it, and it is an unauthenticated job-submission endpoint.

Every node and the driver run with Ray's token authentication on (RAY_AUTH_MODE=token, one shared token file
named by RAY_AUTH_TOKEN_PATH). It must be said explicitly on every node: Ray 2.60 turns it on by itself for a head
when ~/.ray/auth_token exists (any earlier local `ray.init()` writes one) but not for a node that joins, which is then
refused by the GCS with InvalidAuthToken.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

WORKER_PORTS = 16


@dataclass(frozen=True, kw_only=True)
class NodePorts:
    """The TCP ports one Ray node listens on (the head adds the GCS port, given apart)."""

    node_manager: int = 6380
    object_manager: int = 6381
    runtime_env_agent: int = 6382
    dashboard_agent_grpc: int = 6383
    dashboard_agent_listen: int = 6384
    metrics_export: int = 6385
    ray_client_server: int = 10001
    min_worker: int = 10002
    max_worker: int = 10002 + WORKER_PORTS - 1


def _free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
        return True
    except OSError:
        return False


def node_ports(low: int = 23000, high: int = 23999, taken: NodePorts | None = None) -> NodePorts:
    """Free ports for one node on a machine that already runs other nodes or other Ray clusters (tests), apart from
    the ports `taken` gives another node here: some of a node's servers bind only after its `ray start` returns,
    so a port that is free now may be the other node's."""
    reserved = set(range(taken.min_worker, taken.max_worker + 1)) | set(asdict(taken).values()) if taken else set()
    fixed = [p for p in range(low, high) if p not in reserved and _free(p)]
    block = next(
        (p for p in fixed if all(_free(q) for q in range(p, p + WORKER_PORTS)) and p + WORKER_PORTS < high), None
    )
    singles = [p for p in fixed if block is None or not block <= p < block + WORKER_PORTS]
    if block is None or len(singles) < 7:
        raise RuntimeError(f"not enough free ports in {low}-{high} for a Ray node")
    names = ("node_manager", "object_manager", "runtime_env_agent", "dashboard_agent_grpc")
    names += ("dashboard_agent_listen", "metrics_export", "ray_client_server")
    return NodePorts(**dict(zip(names, singles, strict=False)), min_worker=block, max_worker=block + WORKER_PORTS - 1)


def auth_env(token_path: Path) -> dict[str, str]:
    """The environment every `ray start` of the cluster, and the tq_serve driver, runs with."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def ensure_token(token_path: Path) -> Path:
    """The cluster's token file, created (random, owner-only) when missing; copy it to every node."""
    if not token_path.exists():
        token_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return token_path


def ray_start_command(
    node_ip: str,
    ports: NodePorts,
    temp_dir: str | None = None,
    *,
    head_port: int | None = None,
    head_address: str | None = None,
    num_cpus: int = 1,
    num_gpus: int = 0,
    object_store_bytes: int = 100 * 2**20,
) -> list[str]:
    """The `ray start` command of a head (head_port) or of a node joining head_address."""
    if (head_port is None) == (head_address is None):
        raise ValueError("give head_port for the head node or head_address for a node that joins")
    ray = str(Path(sys.executable).with_name("ray"))
    head = ["--head", "--port", str(head_port), "--include-dashboard", "false"]
    role = head if head_port is not None else ["--address", head_address]
    command = [ray, "start", *role, "--node-ip-address", node_ip, "--num-cpus", str(num_cpus)]
    command += ["--num-gpus", str(num_gpus), "--object-store-memory", str(object_store_bytes)]
    command += ["--disable-usage-stats"]
    for name, port in asdict(ports).items():
        command += [f"--{name.replace('_', '-')}-port", str(port)]
    return command + (["--temp-dir", temp_dir] if temp_dir else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tq_serve.deploy.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-ip", required=True, help="the address this node is reached at by the others")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node (GCS on --port)")
    role.add_argument("--address", help="HEAD_IP:PORT of the head to join")
    parser.add_argument("--port", type=int, default=6379, help="the head's GCS port (6379)")
    parser.add_argument("--num-cpus", type=int, default=1, help="CPUs for engines on this node (1 per CPU replica)")
    parser.add_argument("--num-gpus", type=int, default=0, help="GPUs for engines on this node (1 per GPU replica)")
    parser.add_argument(
        "--token-file", type=Path, default=Path.home() / ".ray" / "auth_token",
        help="the cluster's shared auth token (created on the head when missing; copy it to every node)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.head:
        ensure_token(args.token_file)
    elif not args.token_file.exists():
        print(f"error: no token file {args.token_file}: copy the head's token file here first", file=sys.stderr)
        return 2
    command = ray_start_command(
        args.node_ip,
        NodePorts(),
        head_port=args.port if args.head else None,
        head_address=args.address,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    command[0] = "ray"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in auth_env(args.token_file).items())
    print(f"{env} {shlex.join(command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
