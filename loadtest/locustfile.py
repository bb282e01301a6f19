"""Locust users that stream an OpenAI-compatible server (tq_serve, SGLang, vLLM) and measure what a user feels.

    python loadtest/run.py --workload mixed --users 4 --duration 60s        # what `make loadtest` runs
    locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:30000 -u 4 -r 2 -t 60s --workload chat

Each request streams /v1/chat/completions or /v1/completions (--api) and fires locust request events, so locust's
tables, percentiles and HTML report cover every metric; request_type is the API, the name says metric and workload:

    chat  E2E shared-prefix    request sent -> [DONE]; response_length = output tokens; failures are reported here
    chat  TTFT shared-prefix   request sent -> first chunk with text
    chat  ITL shared-prefix    this request's mean gap between tokens: (t_last - t_first) / (output_tokens - 1)

Output tokens come from the final usage chunk (stream_options.include_usage), else from the chunks with text.
A failure is an HTTP status >= 400, a malformed SSE line or chunk, an error object in the stream, a stream that ends
without [DONE], a dropped connection, a timeout, or a stream without any text; its reason names which.

Workloads (--workload): `chat` short prompts; `shared-prefix` one long system prompt shared by all requests plus a
short question (RadixAttention serves the prefix from its cache, primed by one request per API before the test);
`long-context` prompts near the model's context length; `mixed` picks one of those per request (weights 6:3:1);
`sessions` multi-turn conversations about documents: each user opens a session on one of --documents documents
(--document-tokens each), drawn with Zipf popularity (--zipf), and asks --turns questions in it, each request resending
the document and the whole history so far (its earlier questions and the server's answers), so the prefix cache
decides how much of every prompt is recomputed: the working set is the popular documents and the live histories.
Prompts are code-like text generated from --seed: the same options give the same prompts. Sizes are in tokens,
converted to characters with the server's own count (one probe request at start, max_tokens=1) and the context
length from /v1/models (or --context-length).

Bounded: locust's --run-time bounds the time, --max-requests the count, --request-timeout each request. Only
loopback hosts are accepted unless --allow-remote is given.

With --results-dir DIR, each finished request is appended to DIR/requests.jsonl and the run (options, model, start
and end) is written to DIR/run.json; loadtest/summarize.py computes exact percentiles from them (locust's own
histogram rounds to 2 significant digits). Keep to one locust process (no --processes): the records are per process.

This file runs only inside locust's own process: gevent monkey-patches the standard library, which breaks ssl when
mixed with ray or requests imported before it (docs/ARCHITECTURE.md section 1). Nothing under tq_serve/ or tests/
imports it.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import gevent
import locust
import requests
from locust import User, events, task
from locust.exception import CatchResponseError, StopUser
from loopback import is_loopback
from tq_serve.autotune.provenance import git_commit  # standard library only: safe beside gevent

HERE = Path(__file__).resolve().parent
DEFAULT_HOST = "http://127.0.0.1:30000"
WORKLOADS = ("chat", "shared-prefix", "long-context", "mixed", "sessions")
MIXED_WEIGHTS = {"chat": 6, "shared-prefix": 3, "long-context": 1}
APIS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Room left below the context length for the error of the chars -> tokens estimate on a long prompt.
LONG_CONTEXT_MARGIN = 0.08
PROBE_MAX_CHARS = 4000
ERROR_TEXT_CHARS = 120

log = logging.getLogger("loadtest")


class StreamFailure(CatchResponseError):
    """A request that did not stream a complete answer; locust's failure table shows the message as is."""


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--workload", choices=WORKLOADS, default="mixed", help="request profile (default: mixed)")
    parser.add_argument(
        "--api", choices=("chat", "completions", "both"), default="both", help="endpoint; both alternates per request"
    )
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt of chat, question of shared-prefix")
    parser.add_argument("--prefix-tokens", type=int, default=512, help="shared system prompt of shared-prefix")
    parser.add_argument(
        "--long-prompt-tokens", type=int, default=0, help="long-context prompt; 0: the context length minus a margin"
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--documents", type=int, default=24, help="sessions: distinct documents")
    parser.add_argument("--document-tokens", type=int, default=320, help="sessions: tokens of each document")
    parser.add_argument("--turns", type=int, default=3, help="sessions: questions per session")
    parser.add_argument("--zipf", type=float, default=1.1, help="sessions: exponent s of document popularity 1/rank^s")
    parser.add_argument(
        "--ignore-eos",
        type=_flag,
        default=True,
        help="true: always generate --output-tokens (SGLang/vLLM extension); false: stop at end of sequence",
    )
    parser.add_argument("--context-length", type=int, default=0, help="0: from /v1/models (max_model_len)")
    parser.add_argument("--model", default="", help="model name sent in requests; default: the first of /v1/models")
    parser.add_argument(
        "--api-key", default="", env_var="LOCUST_API_KEY", is_secret=True, help="sent as Authorization: Bearer KEY"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated prompts")
    parser.add_argument("--max-requests", type=int, default=10_000, help="stop the test after this many requests")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--results-dir", default="", help="write requests.jsonl and run.json here")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not a loopback address")


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# ---- prompts: deterministic code-like text -------------------------------------------------------------------------

VERBS = ("parse", "load", "merge", "count", "find", "update", "render", "split", "check", "collect", "encode", "sort")
NOUNS = ("tokens", "records", "lines", "config", "users", "paths", "events", "rows", "blocks", "items", "chunks")
NAMES = ("value", "item", "count", "total", "index", "buffer", "record", "path", "key", "node", "limit", "offset")
OPERATORS = ("<", ">", "<=", ">=", "==", "!=")


def _function(rng: random.Random) -> str:
    verb, noun = rng.choice(VERBS), rng.choice(NOUNS)
    a, b, x, out = rng.sample(NAMES, 4)
    body = [
        f"def {verb}_{noun}({a}, {b}={rng.randint(0, 99)}):",
        f'    """{verb.capitalize()} the {noun} of {a} against {b}."""',
        f"    {out} = []",
        f"    for {x} in {a}:",
        f"        if {x} {rng.choice(OPERATORS)} {b}:",
        f"            {out}.append({x} {rng.choice('+-*')} {rng.randint(1, 9)})",
    ]
    if rng.random() < 0.5:
        body += [f"        elif {x} is None:", "            continue"]
    if rng.random() < 0.5:
        body += [f"    {out}.sort(reverse={rng.choice(('True', 'False'))})"]
    body += [f"    return {out}", "", ""]
    return "\n".join(body)


def code_text(rng: random.Random, chars: int) -> str:
    """Python-like functions, about `chars` characters, cut at a line end (code suits the bundled code model)."""
    parts, size = [], 0
    while size < chars:
        parts.append(_function(rng))
        size += len(parts[-1])
    text = "".join(parts)[:chars]
    return text[: text.rfind("\n") + 1] or text


# ---- server facts, measured once -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerFacts:
    model: str
    context_length: int
    chars_per_token: float


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe_server(host: str, options) -> ServerFacts:
    """Model name and context length from /v1/models; characters per token of our prompts from one completion."""
    headers = _headers(options.api_key)
    response = requests.get(f"{host}/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    cards = response.json().get("data") or [{}]
    model = options.model or cards[0].get("id", "")
    context_length = options.context_length or int(cards[0].get("max_model_len") or 0)
    if not context_length:
        raise ValueError("the server does not report max_model_len in /v1/models: pass --context-length")
    # Half the context at most, even for a tokenizer with one token per character.
    sample = code_text(random.Random(f"{options.seed}:probe"), min(PROBE_MAX_CHARS, context_length // 2))
    body = {"model": model, "prompt": sample, "max_tokens": 1, "temperature": 0}
    response = requests.post(f"{host}/v1/completions", json=body, headers=headers, timeout=options.request_timeout)
    response.raise_for_status()
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    return ServerFacts(model=model, context_length=context_length, chars_per_token=len(sample) / prompt_tokens)


@dataclass(frozen=True)
class Profile:
    """Prompt sizes of one run, in characters (from the token options and the server's chars per token)."""

    question_chars: int
    system_prompt: str
    long_prompt_chars: int
    documents: tuple[str, ...] = ()
    document_weights: tuple[float, ...] = ()

    @classmethod
    def build(cls, options, facts: ServerFacts) -> Profile:
        long_tokens = options.long_prompt_tokens or int(
            facts.context_length * (1 - LONG_CONTEXT_MARGIN) - options.output_tokens
        )
        if options.workload in ("long-context", "mixed") and long_tokens + options.output_tokens > facts.context_length:
            raise ValueError(
                f"--long-prompt-tokens {long_tokens} + --output-tokens {options.output_tokens} exceed the context "
                f"length {facts.context_length}"
            )
        header = "You are a code assistant. Continue the code of this project.\n\n"
        prefix = code_text(random.Random(f"{options.seed}:prefix"), int(options.prefix_tokens * facts.chars_per_token))
        documents, weights = (), ()
        if options.workload == "sessions":
            session_tokens = options.document_tokens + options.turns * (options.prompt_tokens + options.output_tokens)
            if session_tokens > facts.context_length:
                raise ValueError(
                    f"a session's last prompt and answer ({session_tokens} tokens: --document-tokens + --turns x "
                    f"(--prompt-tokens + --output-tokens)) exceed the context length {facts.context_length}"
                )
            chars = int(options.document_tokens * facts.chars_per_token)
            documents = tuple(
                f"# document {i}\n" + code_text(random.Random(f"{options.seed}:document:{i}"), chars)
                for i in range(options.documents)
            )
            weights = tuple(1 / (rank + 1) ** options.zipf for rank in range(options.documents))
        return cls(
            question_chars=max(1, int(options.prompt_tokens * facts.chars_per_token)),
            system_prompt=header + prefix,
            long_prompt_chars=max(1, int(long_tokens * facts.chars_per_token)),
            documents=documents,
            document_weights=weights,
        )


# ---- the run: set-up, bounds, records ------------------------------------------------------------------------------


class Run:
    """What every user shares: options, server facts, prompt sizes, the request budget and the records file."""

    def __init__(self, environment) -> None:
        self.environment = environment
        self.options = environment.parsed_options
        self.host = (environment.host or DEFAULT_HOST).rstrip("/")
        self.facts: ServerFacts | None = None
        self.profile: Profile | None = None
        self.started = itertools.count(1)
        self.results_dir = Path(self.options.results_dir) if self.options.results_dir else None
        self.records = None
        self.start_time = self.end_time = 0.0

    def setup(self) -> None:
        self.facts = probe_server(self.host, self.options)
        self.profile = Profile.build(self.options, self.facts)
        if self.options.workload in ("shared-prefix", "mixed"):
            self.prime_prefix_cache()
        log.info("load test: %s", json.dumps(self.describe()))

    def prime_prefix_cache(self) -> None:
        """Send the shared system prompt once per API before the test, so that shared-prefix measures a warm prefix
        cache: otherwise the first request of every user misses together, and on a slow server that is all of them."""
        apis = ("chat", "completions") if self.options.api == "both" else (self.options.api,)
        for api in apis:
            body = request_body(api, self.facts.model, self.profile.system_prompt, "\n", self.options, stream=False)
            response = requests.post(
                self.host + APIS[api],
                json=body | {"max_tokens": 1},
                headers=_headers(self.options.api_key),
                timeout=self.options.request_timeout,
            )
            response.raise_for_status()

    def describe(self) -> dict:
        keys = ("workload", "api", "prompt_tokens", "prefix_tokens", "long_prompt_tokens", "output_tokens")
        keys += ("documents", "document_tokens", "turns", "zipf")
        keys += ("ignore_eos", "seed", "max_requests", "request_timeout")
        return {
            "host": self.host,
            "users": self.options.num_users,
            "spawn_rate": self.options.spawn_rate,
            "run_time_s": self.options.run_time,
            **{key: getattr(self.options, key) for key in keys},
            "server": asdict(self.facts) if self.facts else None,
            "client": {"locust": locust.__version__, "commit": git_commit(), "python": platform.python_version()},
        }

    def take_request(self) -> bool:
        """False once --max-requests requests have started; the first refusal stops the test."""
        number = next(self.started)
        if number == self.options.max_requests + 1:
            log.info("reached --max-requests %d: stopping", self.options.max_requests)
            gevent.spawn(self.environment.runner.quit)
        return number <= self.options.max_requests

    def record(self, entry: dict) -> None:
        if self.records is not None:
            self.records.write(json.dumps(entry) + "\n")
            self.records.flush()

    def open_records(self) -> None:
        self.start_time = time.time()
        if self.results_dir is not None:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            self.records = open(self.results_dir / "requests.jsonl", "w")

    def close_records(self) -> None:
        self.end_time = time.time()
        if self.records is not None:
            self.records.close()
            self.records = None
            info = {"start_time": self.start_time, "end_time": self.end_time, **self.describe()}
            (self.results_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")


RUN: Run | None = None


@events.init.add_listener
def _on_init(environment, **_) -> None:
    global RUN
    RUN = Run(environment)
    if not (RUN.options.allow_remote or is_loopback(RUN.host)):
        sys.exit(f"loadtest: refusing host {RUN.host}: not a loopback address (pass --allow-remote to load it)")
    try:
        RUN.setup()
    except (requests.RequestException, ValueError, KeyError, ZeroDivisionError) as err:
        sys.exit(f"loadtest: cannot set up against {RUN.host}: {err}")


@events.test_start.add_listener
def _on_test_start(**_) -> None:
    RUN.open_records()


@events.test_stop.add_listener
def _on_test_stop(**_) -> None:
    RUN.close_records()


# ---- streaming one request -----------------------------------------------------------------------------------------


@dataclass
class Stream:
    """Timings of one streamed answer (perf_counter seconds)."""

    first: float | None = None
    last: float | None = None
    text_chunks: int = 0
    usage: dict | None = None
    text: str = ""


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:ERROR_TEXT_CHARS]
    error = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    message = message or (error.get("message") if isinstance(error, dict) else error) or body
    return str(message)[:ERROR_TEXT_CHARS]


def _chunk_text(api: str, chunk: dict) -> str:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise StreamFailure("malformed SSE chunk: no choices")
    try:
        if api == "chat":
            return "".join(choice["delta"].get("content") or "" for choice in choices)
        return "".join(choice["text"] or "" for choice in choices)
    except (KeyError, TypeError, AttributeError):
        raise StreamFailure(f"malformed SSE chunk: no {'delta' if api == 'chat' else 'text'} in a choice") from None


def read_stream(api: str, response: requests.Response, deadline: float) -> Stream:
    """Parse an SSE stream of OpenAI chunks up to [DONE]; raise StreamFailure on anything else."""
    stream, done = Stream(), False
    for raw in response.iter_lines():
        if time.perf_counter() > deadline:
            raise StreamFailure("timed out: request longer than --request-timeout")
        line = raw.decode("utf-8", errors="replace")
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field in ("event", "id", "retry"):
            continue
        if field != "data":
            raise StreamFailure("malformed SSE line: not a data field")
        if done:
            raise StreamFailure("malformed SSE stream: data after [DONE]")
        value = value.removeprefix(" ")
        if value == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(value)
        except ValueError:
            raise StreamFailure("malformed SSE chunk: not JSON") from None
        if not isinstance(chunk, dict):
            raise StreamFailure("malformed SSE chunk: not a JSON object")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StreamFailure(f"error in stream: {str(message)[:ERROR_TEXT_CHARS]}")
        text = _chunk_text(api, chunk)
        if chunk.get("usage"):
            stream.usage = chunk["usage"]
        if text:
            now = time.perf_counter()
            stream.first = stream.first or now
            stream.last = now
            stream.text_chunks += 1
            stream.text += text
    if not done:
        raise StreamFailure("stream ended without [DONE]")
    if stream.first is None:
        raise StreamFailure("no tokens in stream")
    return stream


def request_body(
    api: str, model: str, system: str, prompt: str, options, stream: bool = True, history: Sequence[tuple] = ()
) -> dict:
    """An OpenAI request for `api`; `system` goes into a system message (chat) or before the prompt (completions),
    and `history`, earlier (question, answer) pairs of a conversation, between them."""
    body = {"model": model, "max_tokens": options.output_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if options.ignore_eos:
        body["ignore_eos"] = True
    if api == "completions":
        return body | {"prompt": system + "".join(q + a for q, a in history) + prompt}
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return body | {"messages": [*messages, {"role": "user", "content": prompt}]}


@dataclass
class Conversation:
    """A user's session about one document (sessions workload): the turns asked so far, with their answers."""

    document: int
    history: list[tuple[str, str]]


class OpenAIUser(User):
    """One client: sends the next request of its workload as soon as the previous answer is complete."""

    host = DEFAULT_HOST
    numbers = itertools.count()

    def on_start(self) -> None:
        self.number = next(self.numbers)
        self.sent = 0
        self.conversation: Conversation | None = None
        self.pending_question = ""
        self.session = requests.Session()
        self.session.headers.update(_headers(RUN.options.api_key))

    def on_stop(self) -> None:
        self.session.close()

    @task
    def next_request(self) -> None:
        if not RUN.take_request():
            raise StopUser
        rng = random.Random(f"{RUN.options.seed}:{self.number}:{self.sent}")
        workload = RUN.options.workload
        if workload == "mixed":
            workload = rng.choices(list(MIXED_WEIGHTS), weights=list(MIXED_WEIGHTS.values()))[0]
        api = RUN.options.api if RUN.options.api != "both" else ("chat", "completions")[self.sent % 2]
        self.sent += 1
        self.send(api, workload, self.body(api, workload, rng))

    def body(self, api: str, workload: str, rng: random.Random) -> dict:
        profile = RUN.profile
        if workload == "sessions":
            return self.session_body(api, rng)
        system = profile.system_prompt if workload == "shared-prefix" else ""
        chars = profile.long_prompt_chars if workload == "long-context" else profile.question_chars
        return request_body(api, RUN.facts.model, system, code_text(rng, chars), RUN.options)

    def session_body(self, api: str, rng: random.Random) -> dict:
        """The next turn of this user's session, or the first turn of a new one on a Zipf-drawn document."""
        profile = RUN.profile
        if self.conversation is None or len(self.conversation.history) >= RUN.options.turns:
            document = rng.choices(range(len(profile.documents)), weights=profile.document_weights)[0]
            self.conversation = Conversation(document=document, history=[])
        question = "\n# question\n" + code_text(rng, profile.question_chars)
        self.pending_question = question
        document = profile.documents[self.conversation.document]
        return request_body(api, RUN.facts.model, document, question, RUN.options, history=self.conversation.history)

    def send(self, api: str, workload: str, body: dict) -> None:
        fire = self.environment.events.request.fire
        entry = {"time": time.time(), "workload": workload, "api": api, "user": self.number}
        if workload == "sessions":
            entry |= {"document": self.conversation.document, "turn": len(self.conversation.history)}
        start = time.perf_counter()
        try:
            with self.session.post(
                RUN.host + APIS[api], json=body, stream=True, timeout=RUN.options.request_timeout
            ) as response:
                if response.status_code >= 400:
                    raise StreamFailure(f"HTTP {response.status_code}: {_error_message(response)}")
                stream = read_stream(api, response, start + RUN.options.request_timeout)
        except StreamFailure as failure:
            error = failure
        except requests.Timeout:
            error = StreamFailure("timed out: no data for --request-timeout")
        except requests.exceptions.ChunkedEncodingError:
            error = StreamFailure("connection dropped mid-stream")
        except requests.ConnectionError as err:
            # requests reports a read timeout in the middle of a stream as a ConnectionError.
            timed_out = "timed out" in str(err)
            error = StreamFailure("timed out: no data for --request-timeout" if timed_out else "connection failed")
        except gevent.GreenletExit:
            # Locust stops users still in a request after --stop-timeout: neither a success nor the server's fault.
            RUN.record(entry | {"ok": False, "interrupted": True, "e2e_ms": (time.perf_counter() - start) * 1000})
            raise
        else:
            error = None
        end = time.perf_counter()
        e2e_ms = (end - start) * 1000
        if error is not None:
            fire(
                request_type=api,
                name=f"E2E {workload}",
                response_time=e2e_ms,
                response_length=0,
                exception=error,
                context={},
            )
            RUN.record(entry | {"ok": False, "error": str(error), "e2e_ms": e2e_ms})
            return
        if workload == "sessions":
            self.conversation.history.append((self.pending_question, stream.text))
        usage = stream.usage or {}
        output_tokens = usage.get("completion_tokens") or stream.text_chunks
        ttft_ms = (stream.first - start) * 1000
        itl_ms = (stream.last - stream.first) * 1000 / (output_tokens - 1) if output_tokens > 1 else None
        fire(request_type=api, name=f"E2E {workload}", response_time=e2e_ms, response_length=output_tokens, context={})
        fire(request_type=api, name=f"TTFT {workload}", response_time=ttft_ms, response_length=0, context={})
        if itl_ms is not None:
            fire(request_type=api, name=f"ITL {workload}", response_time=itl_ms, response_length=0, context={})
        RUN.record(
            entry
            | {
                "ok": True,
                "e2e_ms": e2e_ms,
                "ttft_ms": ttft_ms,
                "itl_ms": itl_ms,
                "output_tokens": output_tokens,
                "prompt_tokens": usage.get("prompt_tokens"),
                # Radix-cache hits; servers report them in the usage only when asked (SGLang --enable-cache-report).
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            }
        )
