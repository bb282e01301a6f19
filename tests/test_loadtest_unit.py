"""Fast tests of the load-test suite: summary and compare arithmetic in-process, the locustfile's stream and failure
accounting against a fake OpenAI-compatible server. Locust runs as a subprocess only (gevent must not patch pytest).
The real server is exercised by tests/test_loadtest.py."""

from __future__ import annotations

import importlib.util
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LOADTEST = Path(__file__).resolve().parents[1] / "loadtest"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"loadtest_{name}", LOADTEST / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load("summarize")
loopback = _load("loopback")


def run_loadtest(out: Path, host: str, *args: str, duration: str = "4s", users: int = 2, timeout: float = 120):
    """`python loadtest/run.py` into `out`; returns (exit code, summary or None, output)."""
    command = [sys.executable, str(LOADTEST / "run.py"), "--host", host, "--users", str(users)]
    command += ["--spawn-rate", str(users), "--duration", duration, "--out", str(out), "--stop-timeout", "5s", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return done.returncode, summary, done.stdout + done.stderr


# ---- summary arithmetic ----------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert summarize.percentile(values, 50) == 3.0
    assert summarize.percentile(values, 90) == pytest.approx(4.6)
    assert summarize.percentile(values, 0) == 1.0
    assert summarize.percentile(values, 100) == 5.0
    assert summarize.percentile([7.0], 99) == 7.0


def _record(workload: str, ok: bool = True, error: str = "", ttft: float = 10.0, itl: float | None = 2.0) -> dict:
    if not ok:
        return {"workload": workload, "api": "chat", "ok": False, "error": error, "e2e_ms": 5.0}
    return {"workload": workload, "api": "chat", "ok": True, "ttft_ms": ttft, "itl_ms": itl, "e2e_ms": 100.0}


def _run_info() -> dict:
    return {"start_time": 100.0, "end_time": 110.0, "workload": "mixed", "users": 2, "host": "http://127.0.0.1:1"}


def test_summary_counts_rates_and_failure_reasons():
    records = [_record("chat", ttft=t) | {"output_tokens": 8, "prompt_tokens": 40} for t in (10.0, 20.0, 30.0)]
    records[0] |= {"cached_tokens": 30}
    records[1] |= {"cached_tokens": 0}
    records += [_record("long-context", itl=None) | {"output_tokens": 1}]
    records += [_record("chat", ok=False, error="HTTP 500: boom")] * 2 + [_record("chat", ok=False, error="dropped")]
    records += [{"workload": "chat", "api": "chat", "ok": False, "interrupted": True, "e2e_ms": 3.0}]
    summary = summarize.summarize(_run_info(), records, label="x")
    assert summary["requests"] == {"completed": 4, "failed": 3, "interrupted": 1, "per_s": 0.4}
    assert summary["output_tokens"] == {"total": 25, "per_s": 2.5, "mean": 6.25}
    assert summary["failures"] == {"HTTP 500: boom": 2, "dropped": 1}
    assert summary["ttft_ms"]["n"] == 4 and summary["ttft_ms"]["p50"] == 15.0
    assert summary["itl_ms"]["n"] == 3, "a one-token answer has no inter-token latency"
    assert summary["prompt_tokens_mean"] == 40.0
    assert summary["cached_prompt_fraction"] == 0.375, "over the requests whose usage reports cached tokens"
    assert summary["by_workload"]["chat"]["requests"] == {"completed": 3, "failed": 3, "interrupted": 1, "per_s": 0.3}
    assert summary["by_workload"]["long-context"]["itl_ms"] == {"n": 0}
    text = summarize.format_summary(summary)
    assert "4 completed, 3 failed" in text and "1 interrupted" in text and "38% of prompt tokens" in text
    assert "HTTP 500: boom" in text and "long-context" in text


def test_summarize_dir_and_compare_cli(tmp_path, capsys):
    for name, ttft in (("tq4", 10.0), ("bf16", 20.0)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "run.json").write_text(json.dumps(_run_info()))
        lines = [json.dumps(_record("chat", ttft=ttft) | {"output_tokens": 4}) for _ in range(5)]
        (run_dir / "requests.jsonl").write_text("\n".join(lines) + "\n")
        assert summarize.main(["summarize", str(run_dir)]) == 0
        assert json.loads((run_dir / "summary.json").read_text())["label"] == name
        assert (run_dir / "summary.txt").read_text().startswith(f"{name}: workload mixed")
    capsys.readouterr()
    assert summarize.main(["compare", str(tmp_path / "tq4"), str(tmp_path / "bf16" / "summary.json")]) == 0
    table = capsys.readouterr().out
    header, *rows = table.splitlines()
    assert header.split() == ["tq4", "bf16", "B/A"]
    ttft_p50 = next(row for row in rows if row.startswith("TTFT p50"))
    assert ttft_p50.split()[-3:] == ["10.0", "20.0", "2.00x"]


def test_compare_reports_a_missing_file(tmp_path, capsys):
    assert summarize.main(["compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json")]) == 1
    assert "summarize: error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:30000", True),
        ("http://localhost:8000", True),
        ("http://127.8.0.1", True),
        ("http://[::1]:30000", True),
        ("http://10.0.0.5:30000", False),
        ("https://api.example.com", False),
        ("http://0.0.0.0:30000", False),
    ],
)
def test_loopback_rule(url, expected):
    assert loopback.is_loopback(url) is expected


# ---- a fake OpenAI-compatible server ---------------------------------------------------------------------------------


class FakeOpenAI(ThreadingHTTPServer):
    """Streams OpenAI chunks on 127.0.0.1; each streamed request gets the next behaviour of `behaviours` in turn:
    ok, http-500, drop (connection closed mid-stream), no-done (clean end without [DONE]), malformed (chunk not JSON),
    slow (one token a second).
    """

    daemon_threads = True

    def __init__(self, behaviours: list[str], api_key: str = "") -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.behaviours = itertools.cycle(behaviours)
        self.lock = threading.Lock()
        self.api_key = api_key
        self.streamed = 0
        self.streamed_bodies: list[dict] = []

    def handle_error(self, request, client_address) -> None:
        pass  # the drop behaviour breaks its own connection on purpose

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_behaviour(self) -> str:
        with self.lock:
            self.streamed += 1
            return next(self.behaviours)


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeOpenAI

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._json(401, {"object": "error", "message": "bad key", "code": 401})
            return False
        return True

    def do_GET(self) -> None:
        if self._authorized():
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "max_model_len": 2048}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        if not body.get("stream"):
            prompt = body.get("prompt") or "".join(message["content"] for message in body["messages"])
            usage = {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": 1}
            self._json(200, {"choices": [{"text": "x"}], "usage": usage})
            return
        behaviour = self.server.next_behaviour()
        self.server.streamed_bodies.append(body)
        if behaviour == "http-500":
            self._json(500, {"object": "error", "message": "fake overload", "code": 500})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chat = self.path.endswith("/chat/completions")
        if chat:
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        tokens = body["max_tokens"]
        for i in range(tokens):
            if behaviour == "drop" and i == 3:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if behaviour == "malformed" and i == 2:
                self._chunk(b"data: {not json\n\n")
            choice = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
            self._event({"choices": [choice]})
            time.sleep(1.0 if behaviour == "slow" else 0.002)
        usage = {"prompt_tokens": 10, "completion_tokens": tokens, "prompt_tokens_details": {"cached_tokens": 4}}
        self._event({"choices": [], "usage": usage})
        if behaviour != "no-done":
            self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, chunk: dict) -> None:
        self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture
def fake_server(request):
    behaviours, api_key = request.param
    server = FakeOpenAI(behaviours, api_key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("fake_server", [(["ok"], "secret-key")], indirect=True)
def test_streams_are_measured_and_the_key_is_sent(fake_server, tmp_path):
    # --api after --api-key: run.py must pass it to locust, not read it as an abbreviation of its own --api-key.
    args = ["--workload", "mixed", "--api-key", "secret-key", "--output-tokens", "8", "--api", "both"]
    code, summary, output = run_loadtest(tmp_path / "run", fake_server.url, *args)
    assert code == 0, output
    assert summary["requests"]["failed"] == 0 and summary["failures"] == {}
    assert summary["requests"]["completed"] > 0
    assert summary["output_tokens"]["mean"] == 8
    assert summary["prompt_tokens_mean"] == 10 and summary["cached_prompt_fraction"] == 0.4
    assert summary["ttft_ms"]["n"] == summary["itl_ms"]["n"] == summary["requests"]["completed"]
    assert 0 < summary["itl_ms"]["p50"] < 1000
    assert {r["api"] for r in map(json.loads, (tmp_path / "run" / "requests.jsonl").read_text().splitlines())} == {
        "chat",
        "completions",
    }
    stats = json.loads((tmp_path / "run" / "locust_stats.json").read_text())
    names = {entry["name"] for entry in stats}
    assert {"TTFT chat", "ITL chat", "E2E chat"} <= names
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.parametrize("fake_server", [(["http-500", "drop", "no-done", "malformed", "ok"], "")], indirect=True)
def test_broken_streams_are_failures_with_reasons(fake_server, tmp_path):
    code, summary, output = run_loadtest(tmp_path / "run", fake_server.url, "--workload", "chat", duration="3s")
    assert code == 1, output
    failures = summary["failures"]
    assert set(failures) == {
        "HTTP 500: fake overload",
        "connection dropped mid-stream",
        "stream ended without [DONE]",
        "malformed SSE chunk: not JSON",
    }, failures
    assert summary["requests"]["failed"] == sum(failures.values())
    assert summary["requests"]["completed"] > 0, "every fifth stream is fine"
    assert "HTTP 500: fake overload" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize("fake_server", [(["ok"], "")], indirect=True)
def test_max_requests_bounds_the_count(fake_server, tmp_path):
    code, summary, output = run_loadtest(tmp_path / "run", fake_server.url, "--max-requests", "5", duration="30s")
    assert code == 0, output
    assert summary["requests"]["completed"] == 5
    assert summary["run"]["duration_s"] < 20


@pytest.mark.parametrize("fake_server", [(["slow"], "")], indirect=True)
def test_requests_cut_off_at_the_end_are_interrupted_not_failed(fake_server, tmp_path):
    code, summary, output = run_loadtest(tmp_path / "run", fake_server.url, "--stop-timeout", "1s", duration="2s")
    assert code == 0, output
    assert summary["requests"]["interrupted"] == 2 and summary["requests"]["failed"] == 0
    assert summary["run"]["duration_s"] < 10


@pytest.mark.parametrize("fake_server", [(["ok"], "")], indirect=True)
def test_sessions_resend_their_document_and_whole_history(fake_server, tmp_path):
    args = ["--workload", "sessions", "--api", "completions", "--users", "1", "--max-requests", "7"]
    args += [
        "--documents",
        "3",
        "--document-tokens",
        "40",
        "--turns",
        "3",
        "--prompt-tokens",
        "8",
        "--output-tokens",
        "4",
    ]
    code, summary, output = run_loadtest(tmp_path / "run", fake_server.url, *args, duration="60s")
    assert code == 0, output
    assert summary["requests"]["completed"] == 7 and summary["run"]["workload"] == "sessions"
    prompts = [body["prompt"] for body in fake_server.streamed_bodies]
    answer = " t0 t1 t2 t3"  # what the fake server streams for max_tokens 4
    for turn, prompt in enumerate(prompts):
        assert prompt.startswith("# document ")
        if turn % 3:  # a later turn of the same session: the previous prompt and its answer, then a new question
            assert prompt.startswith(prompts[turn - 1] + answer) and prompt.count("# question") == turn % 3 + 1
        else:  # a new session opens on a document, with no history
            assert prompt.count("# question") == 1


def test_pytest_itself_never_imports_locust():
    # Importing locust monkey-patches the standard library with gevent; the suite only runs it as a subprocess.
    assert "locust" not in sys.modules and "gevent.monkey" not in sys.modules
    assert socket.socket.__module__ == "socket"


def test_run_refuses_a_remote_host(tmp_path):
    code, summary, output = run_loadtest(tmp_path / "run", "http://10.1.2.3:30000")
    assert code == 2 and summary is None
    assert "not a loopback address" in output


def test_locustfile_refuses_a_remote_host():
    command = [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless", "-t", "2s"]
    done = subprocess.run([*command, "-H", "http://192.0.2.1:30000"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "refusing host http://192.0.2.1:30000" in done.stderr
