"""Engine death in single-replica mode: SIGKILL SGLang's scheduler subprocess under a running `python -m tq_serve`.

The server must not stay up with its port open and no engine behind it: it exits non-zero within 30 s, its log names
the process that died, the port closes, no process of its tree is left, and a stream in flight ends instead of
hanging. (SGLang's own subprocess watchdog does the work; this test holds tq_serve's launch to it.) The scheduler is
found by the `pid` label SGLang puts on its scheduler gauges.
"""

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tq_serve.bench.harness import free_port
from tq_serve.metrics import parse_metrics

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

START_TIMEOUT_S = 900
EXIT_TIMEOUT_S = 30


def scheduler_pid(url: str) -> int:
    samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    pids = {s.labels["pid"] for s in samples if s.name == "sglang:num_retracted_reqs" and "pid" in s.labels}
    assert len(pids) == 1, pids
    return int(pids.pop())


def stream_outcome(url: str, started: threading.Event, outcome: list) -> None:
    body = {"model": "tq-tiny", "prompt": "def main():\n", "max_tokens": 900, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    started.set()
                    if line == "data: [DONE]":
                        outcome.append("done")
                        return
        outcome.append("ended without [DONE]")
    except httpx.HTTPError as err:
        outcome.append(f"cut: {type(err).__name__}")
    finally:
        started.set()


def test_killing_the_scheduler_stops_the_server_with_a_named_cause(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tq_serve", "--enable-metrics", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        pid = scheduler_pid(url)
        scheduler = psutil.Process(pid)
        assert scheduler.ppid() == proc.pid
        tree = psutil.Process(proc.pid).children(recursive=True)

        started, outcome = threading.Event(), []
        client = threading.Thread(target=stream_outcome, args=(url, started, outcome))
        client.start()
        assert started.wait(120), "the stream did not start"
        scheduler.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=EXIT_TIMEOUT_S)
        took = time.monotonic() - killed

        assert code != 0
        text = log.read_text()
        assert f"Subprocess scheduler_0 (pid={pid}) crashed with exit code -9" in text, text[-4000:]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
        client.join(timeout=30)
        assert not client.is_alive(), "the in-flight stream hangs"
        assert outcome and outcome[0] != "done", outcome
        print(f"server exited with {code} {took:.1f} s after the scheduler was killed; stream: {outcome[0]}")
    finally:
        if proc.poll() is None:
            proc.kill()
