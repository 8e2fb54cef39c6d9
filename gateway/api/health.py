"""Liveness and readiness probes; both stay open without an API key."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from gateway.auth import PUBLIC
from gateway.state import gateway_state


@get("/health", sync_to_thread=False, opt={PUBLIC: True})
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", opt={PUBLIC: True})
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    state = gateway_state(request)
    ok = state.ready and not state.draining
    body = {"status": "ready" if ok else "unavailable", "models": [r.name for r in state.models]}
    return Response(body, status_code=200 if ok else 503)
