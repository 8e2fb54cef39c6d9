"""A client that left before its request body was read.

Litestar reports it as an ``InternalServerException`` (500), which would log and count a server
error for what is the client's doing. Such requests are answered (to nobody) with 499, nginx's
"client closed request", as the request observer logs a request left later on.
"""

from __future__ import annotations

from litestar.exceptions import HTTPException, InternalServerException

from gateway.observability.request_observer import CLIENT_CLOSED_REQUEST

_LITESTAR_DISCONNECT_DETAIL = "client disconnected prematurely"


def left_before_body(exc: HTTPException) -> bool:
    return isinstance(exc, InternalServerException) and exc.detail == _LITESTAR_DISCONNECT_DETAIL


__all__ = ["CLIENT_CLOSED_REQUEST", "left_before_body"]
