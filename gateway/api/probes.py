"""Liveness and readiness probes and the Prometheus exposition; all open without an API key.

``/health`` answers 200 while the process lives. ``/ready`` answers 200 only when the models are
loaded and serving (no engine process restarting), the database (and Redis, when configured)
answer and the gateway is not shutting down; otherwise 503 with the reasons.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from gateway.api.auth import PUBLIC
from gateway.observability.drain import PROBE
from gateway.observability.wiring import observability
from gateway.state import gateway_state


@get("/health", sync_to_thread=False, opt={PUBLIC: True, PROBE: True})
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", opt={PUBLIC: True, PROBE: True})
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    state = gateway_state(request)
    reasons: list[str] = []
    if not state.ready:
        reasons.append("models: not loaded")
    if state.draining:
        reasons.append("shutting down")
    else:
        if (problem := await observability(request).check_database()) is not None:
            reasons.append(problem)
        if state.ready and (problem := await state.accounting.limiter.problem()) is not None:
            reasons.append(problem)  # shared limits out of reach: every request would get 503
        if state.ready:
            reasons.extend(state.models.problems())  # an engine process restarting, say
    body = {
        "status": "unavailable" if reasons else "ready",
        "models": [r.name for r in state.models],
        "reasons": reasons,
    }
    return Response(body, status_code=503 if reasons else 200)


@get("/metrics", opt={PUBLIC: True, PROBE: True})
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = await observability(request).scrape(request.headers.get("accept"))
    # The exposition's type names its charset already; Litestar would append a second one to text/*.
    return Response(body, media_type=content_type, headers={"content-type": content_type})
