"""The Ray Serve application: one OpenAI-compatible ingress in front of N SGLang engine replicas.

    client --HTTP--> Serve proxy --> Ingress (FastAPI: API key, /health, /v1/*)
                                        | DeploymentHandle, routed by PrefixAffinityRouter on the prompt's prefix
                                        v
                                     EngineReplica x N --HTTP, 127.0.0.1--> `python -m tq_serve` (SGLang, TurboQuant KV)

A replica forwards a request to its engine and streams the answer back as a head (status, content type, replica id)
followed by raw body chunks, so SSE passes through unchanged; the ingress names the replica in `x-tq-replica`.
A replica whose engine died fails its health check and Ray Serve replaces it; requests it holds end with an error
(503 before the answer started, an SSE error event after), never a hang. A request whose replica is gone before it
answered anything (a node lost between routing and the answer) is sent again, to another replica: nothing reached
the client, so nothing is duplicated.

The ingress runs on Ray's head node, next to Serve's one HTTP proxy (proxy_location HeadOnly): losing any other node
costs only the replicas on it. GET /metrics relays one engine's Prometheus text (`--enable-metrics`), each sample
labelled with the replica that answered.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at runtime, and Serve
# rebuilds the class-based handlers' signatures, which leaves string annotations unresolved.
import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator

import httpx
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from tq_serve.deploy.engine import STOP_GRACE_S, EngineError, EngineProcess

APP_NAME = "tq_serve"
ENGINE_DEPLOYMENT = "EngineReplica"
REPLICA_HEADER = "x-tq-replica"
# SGLang compiles and captures graphs at start-up; a large model on a busy machine takes minutes.
ENGINE_START_TIMEOUT_S = 1800.0
# Longest silence tolerated from an engine that is alive: a non-streaming answer arrives only when it is complete.
ENGINE_READ_TIMEOUT_S = 600.0
ENGINE_CONNECT_TIMEOUT_S = 5.0
# check_health only polls the engine process, so it can run often; a dead engine is replaced within seconds.
HEALTH_CHECK_PERIOD_S = 2.0
# The replicas report their KV pool's capacity and fill this often (record_routing_stats), for new prefixes' homes.
ROUTING_STATS_PERIOD_S = 2.0
ROUTING_STATS_TIMEOUT_S = 5.0
KV_GAUGES = ("sglang:kv_available_tokens", "sglang:kv_evictable_tokens", "sglang:kv_used_tokens")
# The ingress holds every request in flight (streams included) while replicas work; Serve's default of 5 would
# serialize the whole deployment behind it.
INGRESS_MAX_ONGOING_REQUESTS = 4096
# Ray's implicit resource of the head node: a sliver of it keeps the ingress there.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Sends of a request whose replica died before answering anything; Serve stops routing to a dead replica within
# seconds (when its node's loss is noticed), so a few spaced tries reach a live one.
FORWARD_ATTEMPTS = 5
FORWARD_RETRY_DELAY_S = 2.0
# A Prometheus sample line: name, optional {labels} (quoted values may hold braces), the rest.
METRIC_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?(\s.*)$')

api = FastAPI(title="tq_serve (Ray Serve)")


def error_body(status: int, message: str) -> bytes:
    """OpenAI's error shape, as SGLang returns it."""
    return json.dumps({"error": {"message": message, "type": "engine_error", "code": status}}).encode()


def sse_error(message: str) -> bytes:
    """How a stream that already answered 200 reports a failure: an error event, then the end marker."""
    return b"data: " + error_body(502, message) + b"\n\ndata: [DONE]\n\n"


class EngineReplica:
    """A Ray Serve replica that owns one SGLang engine process and forwards requests to it."""

    def __init__(self, engine_flags: list[str]):
        self._engine = EngineProcess(engine_flags)
        try:
            self._engine.wait_ready(ENGINE_START_TIMEOUT_S)
        except EngineError:
            self._engine.stop()
            raise
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._client = httpx.AsyncClient(
            base_url=self._engine.url,
            # identity: answers are relayed raw (aiter_raw) without their Content-Encoding, so an engine must never
            # compress them (SGLang's /metrics gzips when asked, and httpx asks by default).
            headers={"Authorization": f"Bearer {self._engine.api_key}", "Accept-Encoding": "identity"},
            timeout=httpx.Timeout(ENGINE_READ_TIMEOUT_S, connect=ENGINE_CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    def _head(self, status: int, content_type: str) -> dict:
        return {"status": status, "content_type": content_type, "replica": self._replica}

    async def forward(self, method: str, path: str, body: dict | None) -> AsyncIterator[dict | bytes]:
        """Yield the head of the engine's answer, then its body chunks as they arrive."""
        request = self._client.build_request(method, path, json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as err:
            yield self._head(503, "application/json")
            yield error_body(503, f"engine of replica {self._replica} unavailable ({type(err).__name__}): {err}")
            return
        try:
            content_type = response.headers.get("content-type", "application/json")
            yield self._head(response.status_code, content_type)
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as err:
                message = f"engine of replica {self._replica} failed mid-answer ({type(err).__name__}): {err}"
                if not content_type.startswith("text/event-stream"):
                    raise EngineError(message) from err
                yield sse_error(message)
        finally:
            await response.aclose()

    async def record_routing_stats(self) -> dict:
        """What the router weighs new prefixes by (router.room_for_prefixes): the engine's KV pool capacity and the
        tokens it holds, cached or running, from the engine's own Prometheus gauges. Serve polls this every
        ROUTING_STATS_PERIOD_S; an engine that cannot answer reports nothing, and the router weighs it as unknown."""
        try:
            response = await self._client.get("/metrics", timeout=ROUTING_STATS_TIMEOUT_S)
        except httpx.HTTPError:
            return {}
        return kv_cache_stats(response.text) if response.status_code == 200 else {}

    def check_health(self) -> None:
        """Ray Serve calls this every HEALTH_CHECK_PERIOD_S; raising makes it replace the replica."""
        code = self._engine.exit_code()
        if code is not None:
            raise EngineError(f"engine (pid {self._engine.pid}) exited with code {code}")

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; a force-killed replica's engine dies without it (see engine.py).
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.stop()


def kv_cache_stats(metrics: str) -> dict:
    """{pool_tokens, cached_tokens} from SGLang's Prometheus text: the pool is available + evictable (radix-cached,
    no request holds them) + used tokens; what it caches is evictable + used. {} when the gauges are missing."""
    values = {}
    for line in metrics.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in KV_GAUGES:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
    if set(values) != set(KV_GAUGES):
        return {}
    available, evictable, used = (values[name] for name in KV_GAUGES)
    return {"pool_tokens": int(available + evictable + used), "cached_tokens": int(evictable + used)}


def label_samples(metrics: str, replica: str) -> str:
    """Prometheus text with `replica="<id>"` added to every sample (comments and blank lines unchanged)."""
    out = []
    for line in metrics.splitlines():
        match = METRIC_SAMPLE.match(line) if line and not line.startswith("#") else None
        if match is None:
            out.append(line)
            continue
        name, labels, rest = match.groups()
        labels = f'replica="{replica}"' + (f",{labels}" if labels else "")
        out.append(f"{name}{{{labels}}}{rest}")
    return "\n".join(out) + "\n"


async def _relay(answer: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """Pass SSE chunks through; a replica that dies mid-stream becomes an error event, not a cut connection."""
    try:
        async for chunk in answer:
            yield chunk
    except ray.exceptions.RayError as err:
        yield sse_error(f"engine replica failed mid-stream: {err}")


@serve.ingress(api)
class Ingress:
    """The one HTTP endpoint: checks the API key and hands /v1/* to an engine replica."""

    def __init__(self, engines: DeploymentHandle, api_key: str | None):
        self._engines = engines.options(stream=True)
        self._api_key = api_key

    def _authorized(self, request: Request) -> bool:
        if self._api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return secrets.compare_digest(given.encode(), f"Bearer {self._api_key}".encode())

    @api.get("/health")
    def health(self) -> JSONResponse:
        """200 while at least one engine replica runs; the body counts replicas by state (no API key, like SGLang)."""
        deployment = serve.status().applications[APP_NAME].deployments[ENGINE_DEPLOYMENT]
        states = dict(deployment.replica_states)
        running = states.get("RUNNING", 0)
        return JSONResponse({"status": "ok" if running else "unavailable", "replicas": states}, 200 if running else 503)

    @api.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def openai(self, path: str, request: Request) -> Response:
        if not self._authorized(request):
            return Response(error_body(401, "Unauthorized"), 401, media_type="application/json")
        body = None
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return Response(error_body(400, "request body is not JSON"), 400, media_type="application/json")
        target = f"/v1/{path}" + (f"?{request.url.query}" if request.url.query else "")
        sent = await self._send(request.method, target, body)
        if isinstance(sent, Response):
            return sent
        answer, head = sent
        headers = {REPLICA_HEADER: head["replica"]}
        if head["content_type"].startswith("text/event-stream"):
            return StreamingResponse(_relay(answer), head["status"], headers, media_type=head["content_type"])
        try:
            content = b"".join([chunk async for chunk in answer])
        except ray.exceptions.RayError as err:
            return Response(error_body(502, f"engine replica failed: {err}"), 502, headers, "application/json")
        return Response(content, head["status"], headers, media_type=head["content_type"])

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """One engine's Prometheus metrics (whichever replica Serve picks), labelled with its replica."""
        if not self._authorized(request):
            return Response(error_body(401, "Unauthorized"), 401, media_type="application/json")
        sent = await self._send("GET", "/metrics", None)
        if isinstance(sent, Response):
            return sent
        answer, head = sent
        try:
            content = b"".join([chunk async for chunk in answer]).decode()
        except ray.exceptions.RayError as err:
            return Response(error_body(502, f"engine replica failed: {err}"), 502, media_type="application/json")
        if head["status"] != 200:
            return Response(content, head["status"], {REPLICA_HEADER: head["replica"]}, head["content_type"])
        return Response(
            label_samples(content, head["replica"]), 200, {REPLICA_HEADER: head["replica"]}, head["content_type"]
        )

    async def _send(self, method: str, target: str, body: dict | None):
        """(answer, head) from a replica, or the 503 Response when none answered after FORWARD_ATTEMPTS sends."""
        for attempt in range(FORWARD_ATTEMPTS):
            answer: DeploymentResponseGenerator = self._engines.forward.remote(method, target, body)
            try:
                return answer, await answer.__anext__()
            except StopAsyncIteration as err:
                error = err
            except ray.exceptions.RayError as err:
                # Only a replica that is gone: nothing of the answer exists yet, so sending again is safe.
                error = err
                if attempt + 1 < FORWARD_ATTEMPTS:
                    await asyncio.sleep(FORWARD_RETRY_DELAY_S)
                    continue
            break
        return Response(error_body(503, f"no engine replica answered: {error}"), 503, media_type="application/json")


def build_app(
    engine_flags: list[str],
    *,
    device: str,
    replicas: int,
    min_replicas: int,
    max_replicas: int,
    target_ongoing_requests: float,
    max_ongoing_requests: int,
    affinity_prefix_chars: int,
    api_key: str | None,
) -> serve.Application:
    """The bound application; autoscaling when min_replicas < max_replicas, else a fixed replica count."""
    scaling = (
        {
            "autoscaling_config": AutoscalingConfig(
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                initial_replicas=replicas,
                target_ongoing_requests=target_ongoing_requests,
            )
        }
        if min_replicas < max_replicas
        else {"num_replicas": replicas}
    )
    engines = serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        # One GPU per engine on CUDA; on a CPU machine each engine reserves one core of the node.
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if device == "cuda" else 0},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=STOP_GRACE_S + 5,
        request_router_config=RequestRouterConfig(
            request_router_class="tq_serve.deploy.router.PrefixAffinityRouter",
            request_router_kwargs={"prefix_chars": affinity_prefix_chars, "max_imbalance": target_ongoing_requests},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=ROUTING_STATS_TIMEOUT_S,
        ),
        **scaling,
    )
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    )
    return ingress.bind(engines.bind(engine_flags), api_key)
