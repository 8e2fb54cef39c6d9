"""A request id on every request, and the ``x-request-id`` header on every response.

The middleware gives routed requests their id before any handler runs (logs and usage rows use
it). The header is added by a before-send hook, which Litestar runs for every response, also
those its router answers itself (an unknown path, a wrong method), where no middleware runs.
"""

from __future__ import annotations

import secrets

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.types import Message as ASGIMessage

from gateway.state import REQUEST_ID_SCOPE_KEY

REQUEST_ID_HEADER = b"x-request-id"


def new_request_id() -> str:
    # Always the gateway's own: usage rows are keyed by it, so a client must not be able to choose it.
    return "req_" + secrets.token_hex(12)


def _assign_request_id(scope: Scope) -> str:
    state = scope.setdefault("state", {})
    rid: str | None = state.get(REQUEST_ID_SCOPE_KEY)
    if rid is None:
        rid = state[REQUEST_ID_SCOPE_KEY] = new_request_id()
    return rid


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            _assign_request_id(scope)
        await self.app(scope, receive, send)


async def add_request_id_header(message: ASGIMessage, scope: Scope) -> None:
    # Async on purpose: Litestar runs a sync hook in a worker thread, for every message sent.
    if message["type"] != "http.response.start":
        return
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
    headers.append((REQUEST_ID_HEADER, _assign_request_id(scope).encode()))
    message["headers"] = headers
