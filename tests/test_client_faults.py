"""Clients that misbehave, against a running `python -m tq_serve` (tq-tiny, 4-bit TurboQuant KV, a 2048-token pool).

Each test drives one fault, then checks that the pool is whole (once idle, every slot is free or held by the radix
cache only, from SGLang's own sglang:kv_* gauges) and that the server still answers. The server runs with SGLang's
strict idle check, so a pool whose slots do not add up stops its scheduler and fails every later test.
"""

import json
import socket
import time

import httpx
import pytest

from tq_serve.bench.harness import running_server
from tq_serve.metrics import PoolSlots, metric_value, parse_metrics

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

MODEL = "tq-tiny"
CONTEXT = 1024  # tq-tiny's context length
POOL_TOKENS = 2048
IDLE_TIMEOUT_S = 120
CHECK_TOKENS = 48
# Many more tokens than tq-tiny's 1024-token context, in characters of code.
OVERLONG = "def f(x):\n    return x + 1\n\n" * 2000
LONG_PROMPT = "".join(f"def helper_{i}(values):\n    return sorted(values)[{i}]\n\n" for i in range(40))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    flags = ["--enable-metrics", "--max-total-tokens", str(POOL_TOKENS)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE", "1")
        with running_server(flags, tmp_path_factory.mktemp("faults") / "server.log") as base:
            yield base


def scrape(url: str) -> list:
    response = httpx.get(f"{url}/metrics", timeout=30)
    response.raise_for_status()
    return parse_metrics(response.text)


def generated_tokens(url: str) -> float:
    return metric_value(scrape(url), "sglang:generation_tokens_total") or 0.0


def assert_pool_whole_and_serving(url: str) -> PoolSlots:
    """Wait until nothing runs or waits and no slot is held by a request; then one request must be served."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        slots = PoolSlots.from_samples(scrape(url))
        if slots.running == 0 and slots.queued == 0 and slots.held_by_requests == 0:
            break
        assert time.monotonic() < deadline, f"pool not whole {IDLE_TIMEOUT_S} s after the fault: {slots}"
        time.sleep(1)
    assert slots.capacity == POOL_TOKENS and slots.free + slots.cached == slots.capacity
    # Longer than SGLang's decode log interval (40 steps): the decode log reports it running, so SGLang republishes
    # its pool gauges as soon as it is idle again, instead of 30 s later (the next check reads fresh figures).
    reply = complete(url, "def add(a, b):\n", max_tokens=CHECK_TOKENS, ignore_eos=True)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == CHECK_TOKENS, reply.text
    return slots


def complete(url: str, prompt: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "temperature": 0} | fields
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_stream_cut_after_a_few_tokens(url):
    before = generated_tokens(url)
    body = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 900, "ignore_eos": True, "stream": True}
    chunks = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks += 1
                if chunks == 3:
                    break  # leaving the block closes the connection mid-stream
    assert_pool_whole_and_serving(url)
    # SGLang aborted the request: far fewer than its 900 tokens were generated (the check's own request makes 48).
    assert generated_tokens(url) - before < 600


def test_connection_dropped_before_the_first_token(url):
    before = generated_tokens(url)
    body = json.dumps({"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True})
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    )
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(request.encode())
            # Closed while the long prompt is still in prefill: no token has been sent yet.
    assert_pool_whole_and_serving(url)
    assert generated_tokens(url) - before < 3 * 600


def test_max_tokens_beyond_the_context_is_refused(url):
    reply = complete(url, "def f():\n", max_tokens=5000)
    assert reply.status_code == 400, reply.text
    assert f"maximum context length of {CONTEXT} tokens" in reply.json()["message"]
    assert_pool_whole_and_serving(url)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_the_context_is_a_400_with_sglangs_message(url, stream):
    reply = complete(url, OVERLONG, max_tokens=8, stream=stream)
    assert reply.status_code == 400, reply.text
    message = reply.json()["message"]
    assert "is longer than the model's context length" in message and f"({CONTEXT} tokens)" in message
    assert_pool_whole_and_serving(url)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_json_is_a_400(url, path):
    reply = httpx.post(
        f"{url}{path}", content=b'{"model": "tq-tiny", "prompt": ', headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400, reply.text
    assert "JSON decode error" in reply.json()["message"]
    assert_pool_whole_and_serving(url)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_name_is_a_404(url, path):
    body = {"model": "llama-3.1-70b", "max_tokens": 4}
    body |= {"prompt": "def f():"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert reply.status_code == 404, reply.text
    assert reply.json()["message"] == "The model `llama-3.1-70b` does not exist: this server serves `tq-tiny`."
    assert_pool_whole_and_serving(url)


def test_many_faults_at_once_leave_the_pool_whole(url):
    """Streams cut at different points while the pool is full: their slots are freed together with the others'."""
    body = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=300) as client:
        streams = [client.stream("POST", f"{url}/v1/completions", json=body | {"seed": i}) for i in range(6)]
        replies = [s.__enter__() for s in streams]
        for cut, (stream, reply) in enumerate(zip(streams, replies, strict=True)):
            lines = reply.iter_lines()
            for _ in range(cut):
                next(lines, None)
            stream.__exit__(None, None, None)
    assert_pool_whole_and_serving(url)
