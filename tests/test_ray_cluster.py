"""A real two-node Ray cluster on this machine, one engine replica per node, and the loss of a node under load.

    ray start --head --node-ip-address 127.0.0.1 ...           the head: GCS, Serve's controller and proxy, ingress
    ray start --address 127.0.0.1:P --node-ip-address 127.0.0.2 a second node, on another loopback address
    python -m tq_serve --replicas 2 --ray-address 127.0.0.1:P   one engine on each node (each node has one CPU)

Locust loads the one endpoint; midway the second node's raylet is killed (SIGKILL: the node is lost, and its workers
and engine with it). The endpoint must keep answering from the head's replica, and every failed request must have
been in flight before the loss (a request routed to the dead replica before Serve noticed is sent again by the
ingress). Every Ray port is pinned with `ray start` flags (tq_serve.deploy.cluster lists them); the test records
which address each listening socket of the cluster binds. The figures are printed (pytest -s) and written to
$TQ_RAY_CLUSTER_REPORT when set. Each node runs in a private temp dir; teardown stops exactly the cluster's
processes (never `ray stop`, which would stop every Ray on the machine).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tq_serve.bench.harness import free_port
from tq_serve.deploy.cluster import auth_env, ensure_token, node_ports, ray_start_command

HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"
START_TIMEOUT_S = 900
LOAD_S = 150
KILL_AFTER_S = 60
USERS = 4
START_ATTEMPTS = 3


def test_ray_start_commands_pin_every_port_and_ray_knows_the_flags():
    ports = node_ports()
    head = ray_start_command(HEAD_IP, ports, head_port=6379)
    worker = ray_start_command(WORKER_IP, ports, head_address="127.0.0.1:6379")
    for command in (head, worker):
        assert command[1] == "start" and command[command.index("--node-ip-address") + 1] in (HEAD_IP, WORKER_IP)
        given = {int(command[i + 1]) for i, flag in enumerate(command) if flag.endswith("-port") and flag != "--port"}
        assert given == set(ports.__dict__.values())
    assert "--include-dashboard" in head and "--include-dashboard" not in worker
    assert "--head" in head and "--address" in worker
    help_text = subprocess.run([head[0], "start", "--help"], capture_output=True, text=True, timeout=120).stdout
    flags = {a for a in head + worker if a.startswith("--")}
    assert {f for f in flags if f not in help_text} == set()
    with pytest.raises(ValueError):
        ray_start_command(HEAD_IP, ports)


def test_a_second_node_on_this_machine_gets_ports_apart_from_the_first():
    first = node_ports()
    second = node_ports(taken=first)
    ports = lambda p: set(range(p.min_worker, p.max_worker + 1)) | set(vars(p).values())  # noqa: E731
    assert not ports(first) & ports(second)


def test_cluster_command_turns_token_auth_on_for_every_node(tmp_path, capsys):
    from tq_serve.deploy import cluster

    token = tmp_path / "ray" / "auth_token"
    assert cluster.main(["--node-ip", WORKER_IP, "--address", "127.0.0.1:6379", "--token-file", str(token)]) == 2
    assert "copy the head's token file" in capsys.readouterr().err and not token.exists()
    assert cluster.main(["--node-ip", HEAD_IP, "--head", "--token-file", str(token)]) == 0
    head = capsys.readouterr().out
    assert (token.stat().st_mode & 0o777) == 0o600 and len(token.read_text()) == 64
    assert cluster.main(["--node-ip", WORKER_IP, "--address", "127.0.0.1:6379", "--token-file", str(token)]) == 0
    worker = capsys.readouterr().out
    for line in (head, worker):
        assert line.startswith(f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} ray start ")


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in p.info["cmdline"] or ()):
            found.append(p)
    return found


def listening(processes: list[psutil.Process]) -> list[dict]:
    """Each TCP socket the processes listen on: which process, which address."""
    rows = []
    for p in processes:
        try:
            name = p.name()
            for conn in p.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    rows.append({"process": name, "address": conn.laddr.ip, "port": conn.laddr.port})
        except psutil.Error:
            continue
    return sorted(rows, key=lambda r: (r["process"], r["port"]))


def stop(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    for p in alive:
        p.kill()


def start_cluster(env: dict) -> tuple[str, str]:
    """(GCS address, temp dir) of a running two-node cluster. Built again from scratch, in a fresh temp dir, when a
    `ray start` fails: a raylet waits a fixed 15 s for its agents' ports, which a busy 2-core machine can exceed."""
    for _ in range(START_ATTEMPTS):
        temp_dir = tempfile.mkdtemp(prefix="tqray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        address = f"{HEAD_IP}:{free_port()}"
        head_ports = node_ports()
        head = ray_start_command(HEAD_IP, head_ports, temp_dir, head_port=int(address.split(":")[1]))
        worker = ray_start_command(WORKER_IP, node_ports(taken=head_ports), temp_dir, head_address=address)
        for command in (head, worker):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                stop(cluster_processes(temp_dir))
                break
        else:
            return address, temp_dir
    raise AssertionError(f"{' '.join(command[:4])} failed:\n{done.stderr[-3000:]}")


@pytest.fixture(scope="module")
def cluster():
    token = ensure_token(Path(tempfile.mkdtemp(prefix="tqray-token-")) / "auth_token")
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"} | auth_env(token)
    address, temp_dir = start_cluster(env)
    try:
        yield {"address": address, "temp_dir": temp_dir, "env": env}
    finally:
        stop(cluster_processes(temp_dir))


def engine_nodes() -> dict[int, str]:
    """{engine pid: node IP}: an engine runs under a Ray worker (whose process title hides its arguments), which runs
    under its node's raylet (`--node_ip_address=IP`)."""
    nodes = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "tq_serve" not in cmd or "--port" not in cmd or "--replicas" in cmd or "--preset" in cmd:
            continue
        for parent in p.parents():
            flags = [a for a in parent.cmdline() if a.startswith(("--node_ip_address=", "--node-ip-address="))]
            if flags:
                nodes[p.pid] = flags[0].split("=", 1)[1]
                break
    return nodes


def raylet_of(node_ip: str, temp_dir: str) -> psutil.Process:
    for p in cluster_processes(temp_dir):
        cmd = p.cmdline()
        if Path(cmd[0]).name == "raylet" and f"--node_ip_address={node_ip}" in cmd:
            return p
    raise AssertionError(f"no raylet of node {node_ip}")


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@pytest.mark.ray
@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("RUN_RAY_CLUSTER_TEST") != "1",
    reason="opt-in (RUN_RAY_CLUSTER_TEST=1): two Ray nodes and two engines on one machine, too "
    "heavy for the default suite; it passed with 387 requests and 0 failed across the node loss (see the README)",
)
def test_two_nodes_one_replica_each_and_the_endpoint_survives_a_node_loss(cluster, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "tq_serve", "--replicas", "2", "--ray-address", cluster["address"]]
    command += ["--port", str(port), "--max-total-tokens", "4096", "--enable-metrics"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cluster["env"])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, log.read_text()[-6000:]
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            try:
                health = httpx.get(f"{url}/health", timeout=10).json()
                if health.get("replicas", {}).get("RUNNING") == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(3)
        nodes = engine_nodes()
        # One engine on each node. The head's raylet runs with the machine's own address whatever
        # --node-ip-address says (Ray 2.60), so the head's node is "not the worker's" rather than 127.0.0.1.
        assert len(nodes) == 2 and WORKER_IP in nodes.values() and len(set(nodes.values())) == 2, nodes
        metrics = httpx.get(f"{url}/metrics", timeout=30)
        assert metrics.status_code == 200 and 'tq_kv_pool_capacity_tokens{replica="' in metrics.text
        ports = listening(cluster_processes(cluster["temp_dir"]))

        out = tmp_path / "load"
        load = [sys.executable, str(LOADTEST / "run.py"), "--host", url, "--workload", "chat", "--users", str(USERS)]
        load += ["--spawn-rate", str(USERS), "--duration", f"{LOAD_S}s", "--out", str(out), "--label", "two-nodes"]
        load += ["--output-tokens", "16", "--prompt-tokens", "32", "--stop-timeout", "120s"]
        locust = subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(KILL_AFTER_S)
        raylet_of(WORKER_IP, cluster["temp_dir"]).send_signal(signal.SIGKILL)
        killed = time.time()
        assert locust.wait(timeout=LOAD_S + 300) in (0, 1)
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 200 and health.json()["replicas"].get("RUNNING") == 1, health.text
        reply = httpx.post(
            f"{url}/v1/completions", json={"model": "tq-tiny", "prompt": "def f():", "max_tokens": 4}, timeout=120
        )
        assert reply.status_code == 200, reply.text

        records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines() if line]
        before = [r for r in records if r["time"] < killed]
        after = [r for r in records if r["time"] >= killed]
        failed = [r for r in records if not r["ok"] and not r.get("interrupted")]
        figures = {
            "requests": len(records),
            "completed_before_loss": sum(r["ok"] for r in before),
            "completed_after_loss": sum(r["ok"] for r in after),
            "failed": len(failed),
            "failures": sorted({r["error"] for r in failed}),
            "ttft_p99_ms_before": percentile([r["ttft_ms"] for r in before if r["ok"]], 99),
            "ttft_p99_ms_after": percentile([r["ttft_ms"] for r in after if r["ok"]], 99),
            "engines": {str(pid): ip for pid, ip in nodes.items()},
            "listening": ports,
        }
        print(json.dumps(figures, indent=1))
        if os.environ.get("TQ_RAY_CLUSTER_REPORT"):
            Path(os.environ["TQ_RAY_CLUSTER_REPORT"]).write_text(json.dumps(figures, indent=1) + "\n")
        assert figures["completed_before_loss"] > 0 and figures["completed_after_loss"] > 0, figures
        # Only what was in flight on the lost node may fail: requests started before the loss, one per user at most.
        assert all(r["time"] < killed for r in failed), figures
        assert len(failed) <= USERS, figures
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=180)
        except subprocess.TimeoutExpired:
            server.kill()
