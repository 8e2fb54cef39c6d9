"""``GET /metrics``: the Prometheus exposition, open without an API key like the probes."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from gateway.auth import PUBLIC
from gateway.drain import PROBE
from gateway.observability import observability


@get("/metrics", opt={PUBLIC: True, PROBE: True})
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = await observability(request).scrape(request.headers.get("accept"))
    return Response(body, media_type=content_type)
