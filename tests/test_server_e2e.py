"""End to end: start `python -m tq_serve` as a user would and talk to it with the OpenAI client.

One server for the module (SGLang takes 30 s to minutes to start on a shared CPU); a few short requests.
The server's settings come from the command line below only: the caller's TQ_* variables are scrubbed
(tests/conftest.py)."""

import httpx
import openai
import pytest

from tq_serve.bench.harness import running_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

API_KEY = "e2e-secret"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """`python -m tq_serve --api-key KEY --port P`, ready (/health answers), stopped after the module."""
    with running_server(["--api-key", API_KEY], tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=300)


def test_binds_to_localhost_and_serves_the_bundled_model(client, base_url):
    assert base_url.startswith("http://127.0.0.1:")
    assert [m.id for m in client.models.list()] == ["tq-tiny"]


def test_requests_without_the_api_key_are_refused(base_url):
    assert httpx.get(f"{base_url}/v1/models", timeout=30).status_code == 401


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="tq-tiny", messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def test_chat_completion_streaming(client):
    stream = client.chat.completions.create(
        model="tq-tiny", messages=[{"role": "user", "content": "def add(a, b):"}], max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_completion(client):
    reply = client.completions.create(model="tq-tiny", prompt="def fib(n):", max_tokens=8, temperature=0)
    assert reply.choices[0].text and reply.choices[0].finish_reason in ("length", "stop")


def test_completion_streaming(client):
    stream = client.completions.create(model="tq-tiny", prompt="def fib(n):", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream)
