"""End to end on Ray Serve: `python -m tq_serve --preset replicas-cpu` (2 replicas of the bundled model on a private
local Ray) as a user starts it, one deployment for the module. The tests run in file order: the last one kills an
engine, and the teardown checks that SIGTERM leaves no process behind. The caller's TQ_* variables do not reach the
server (tests/conftest.py)."""

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tq_serve.bench.harness import ServerProcess, server_process

pytestmark = [pytest.mark.ray, pytest.mark.sglang, pytest.mark.slow]

API_KEY = "deploy-secret"
MODEL = "tq-tiny"
START_TIMEOUT_S = 900
SHUTDOWN_TIMEOUT_S = 120
REPLICA_HEADER = "x-tq-replica"
# About 200 tokens of the bundled model's tokenizer: long enough for the radix cache to hold several pages.
SHARED_PREFIX = "".join(f"def helper_{i}(values):\n    return sorted(values)[{i}]\n\n" for i in range(12))


class Deployment(ServerProcess):
    """The deployment's `python -m tq_serve` (harness.server_process), with the requests the tests send it."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def complete(self, prompt: str, max_tokens: int = 1, timeout: float = 120) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return httpx.post(f"{self.url}/v1/completions", json=body, headers=self.headers, timeout=timeout)

    def health(self) -> dict:
        return _health(self.url)

    def engines(self) -> list[psutil.Process]:
        """The engines' `python -m tq_serve` processes: descendants of the server that serve one port each."""
        found = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "tq_serve" in cmd and "--port" in cmd and "--replicas" not in cmd:
                found.append(p)
        return found


def _wait(condition, timeout_s: float, what: str, deployment: Deployment) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if deployment.proc.poll() is not None:
            pytest.fail(f"server exited with {deployment.proc.returncode}:\n{deployment.log.read_text()[-6000:]}")
        if condition():
            return
        time.sleep(2)
    pytest.fail(f"{what} not within {timeout_s} s:\n{deployment.log.read_text()[-6000:]}")


def _health(url: str) -> dict:
    try:
        return httpx.get(f"{url}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _running(url: str) -> int:
    return _health(url).get("replicas", {}).get("RUNNING", 0)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    flags = ["--preset", "replicas-cpu", "--api-key", API_KEY]
    log = tmp_path_factory.mktemp("deploy") / "server.log"
    with server_process(
        flags,
        log,
        ready=lambda url: _running(url) == 2,
        start_timeout_s=START_TIMEOUT_S,
        stop_timeout_s=SHUTDOWN_TIMEOUT_S,  # SIGTERM first: a SIGKILL-ed server would leave its private Ray running
    ) as server:
        d = Deployment(url=server.url, proc=server.proc, log=server.log)
        yield d
        descendants = psutil.Process(d.proc.pid).children(recursive=True)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=SHUTDOWN_TIMEOUT_S) == 0, d.log_tail(6000)
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, f"left behind: {[p.pid for p in alive]}"


def _replica_of(deployment: Deployment, prompts: list[str]) -> dict[str, str]:
    # Three at a time: fewer than the preset's imbalance allowance (4), so every prompt is served by its home.
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(deployment.complete, prompts))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return {p: r.headers[REPLICA_HEADER] for p, r in zip(prompts, responses, strict=True)}


# Sixteen prompts that differ from their first character on: they spread over the replicas.
DISTINCT = [f"{word} = {i}\n" for i, word in enumerate("alpha bravo charlie delta echo foxtrot golf hotel".split())]
DISTINCT += [f"class Model{i}:\n" for i in range(8)]


def test_models_health_and_api_key(deployment):
    models = httpx.get(f"{deployment.url}/v1/models", headers=deployment.headers, timeout=60)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    assert httpx.get(f"{deployment.url}/v1/models", timeout=60).status_code == 401
    assert deployment.health() == {"status": "ok", "replicas": {"RUNNING": 2}}


def test_both_replicas_serve(deployment):
    assert len(set(_replica_of(deployment, DISTINCT).values())) == 2


def test_a_shared_prefix_lands_on_one_replica_and_hits_its_cache(deployment):
    replicas, cached = set(), []
    for i in range(4):
        reply = deployment.complete(f"{SHARED_PREFIX}def task_{i}(x):\n", max_tokens=2)
        assert reply.status_code == 200, reply.text
        replicas.add(reply.headers[REPLICA_HEADER])
        usage = reply.json()["usage"]
        cached.append(((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0, usage["prompt_tokens"]))
    assert len(replicas) == 1
    # The first request may hit what an earlier test left; every later one reuses most of the shared prefix.
    assert all(hit >= prompt // 2 for hit, prompt in cached[1:]), cached


def test_chat_streams_through_the_endpoint(deployment):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8}
    with httpx.stream(
        "POST", f"{deployment.url}/v1/chat/completions", json=body | {"stream": True}, headers=deployment.headers
    ) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers[REPLICA_HEADER]
        events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 2
    assert not any(_is_error_event(e) for e in events)


def _is_error_event(line: str) -> bool:
    """An SSE `data:` line carrying an error object (a generated token may well be the text "error")."""
    payload = line.removeprefix("data: ")
    return payload != "[DONE]" and "error" in json.loads(payload)


def _succeeds(deployment: Deployment, prompt: str) -> bool:
    try:
        return deployment.complete(prompt, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def _stream(deployment: Deployment, prompt: str, started: list) -> tuple[str, str]:
    """(replica, outcome) of a long streamed completion: outcome is done, error-event or cut."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 300, "ignore_eos": True, "stream": True}
    replica = "?"
    try:
        with httpx.stream(
            "POST", f"{deployment.url}/v1/completions", json=body, headers=deployment.headers, timeout=300
        ) as reply:
            replica = reply.headers.get(REPLICA_HEADER, "?")
            events = []
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        started.append(prompt)
    except httpx.HTTPError:
        return replica, "cut"
    if any(_is_error_event(e) for e in events):
        return replica, "error-event"
    return replica, "done" if events and events[-1] == "data: [DONE]" else "cut"


def test_killing_an_engine_fails_its_requests_only_and_ray_replaces_it(deployment):
    home = _replica_of(deployment, DISTINCT)
    before = set(home.values())
    # Three long streams on each replica, in flight when one engine is killed.
    prompts = [p for r in sorted(before) for p in [q for q in DISTINCT if home[q] == r][:3]]
    engines = deployment.engines()
    assert len(engines) == 2
    started: list[str] = []
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_stream, deployment, p, started) for p in prompts]
        _wait(lambda: len(started) == len(prompts), 120, "every stream started", deployment)
        engines[0].kill()
        outcomes = [f.result() for f in futures]
    by_replica = {r: {o for rr, o in outcomes if rr == r} for r in before}
    assert sorted(map(sorted, by_replica.values())) == [["done"], ["error-event"]], outcomes
    dead = next(r for r, o in by_replica.items() if o == {"error-event"})

    # The endpoint keeps answering: a prompt whose home died is served by the survivor once Ray has noticed.
    orphan = next(p for p in prompts if home[p] == dead)
    _wait(lambda: _succeeds(deployment, orphan), 60, "a request after the kill to succeed", deployment)
    # Ray replaces the replica; the new one serves under a new id.
    _wait(lambda: _running(deployment.url) == 2, START_TIMEOUT_S, "the replaced replica running", deployment)
    after = set(_replica_of(deployment, DISTINCT).values())
    assert len(after) == 2 and dead not in after and len(after - before) == 1
