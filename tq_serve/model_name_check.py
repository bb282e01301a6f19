"""Refuse OpenAI requests for a model this server does not serve: 404, as OpenAI and vLLM answer.

SGLang 0.5.23 serves any `model` name with its one model (it reads a `NAME:ADAPTER` suffix as a LoRA adapter), so a
client that asks for `llama-3.1-70b` from a tq-tiny server gets tq-tiny's tokens under the name it asked for. Behind
one endpoint with several deployments that hides a misrouted request. The check is a plain ASGI middleware, not a
Starlette BaseHTTPMiddleware: it buffers the request body and then hands SGLang the original receive channel, so
SGLang still sees a client that disconnects (and aborts its request) exactly as without it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CHECKED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def unknown_model(body: bytes, served: str) -> str | None:
    """The requested model name when it is neither `served` nor `served:ADAPTER`; None otherwise (also when the body
    is not a JSON object or names no model: SGLang answers those itself)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    if not isinstance(model, str) or model in ("", served) or model.startswith(f"{served}:"):
        return None
    return model


def error_body(model: str, served: str) -> bytes:
    """SGLang's error shape (`object: error`), with OpenAI's 404 code."""
    message = f"The model `{model}` does not exist: this server serves `{served}`."
    return json.dumps(
        {"object": "error", "message": message, "type": "NotFoundError", "param": "model", "code": 404}
    ).encode()


class ModelNameCheck:
    """ASGI middleware: POST /v1/completions and /v1/chat/completions must name the served model."""

    def __init__(self, app: ASGIApp, served_model_name: str):
        self.app = app
        self.served = served_model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHECKED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, message = [], {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)  # disconnected while sending the body
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        model = unknown_model(body, self.served)
        if model is None:
            await self.app(scope, _replay([body], None, receive), send)
            return
        content = error_body(model, self.served)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _replay(bodies: list[bytes], last: Message | None, receive: Receive) -> Receive:
    """A receive channel that yields the buffered body (or the message that ended it), then the original channel."""
    pending: list[Message] = [{"type": "http.request", "body": b, "more_body": False} for b in bodies]
    if last is not None:
        pending.append(last)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed
