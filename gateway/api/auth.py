"""API-key authentication: every route needs a valid key unless it is marked public.

Keys arrive as ``Authorization: Bearer sk-...`` (OpenAI SDKs) or ``Authorization: Token sk-...``
(Replicate's client). The authenticated key is kept in the request's scope for the handlers.

A ``before_request`` hook rather than a Litestar guard: Litestar copies the route handler for
every guard call, which cost more than the key check itself on every request. Like a guard, the
hook runs inside the route, so a refusal is answered in the route's own error shape (Replicate
routes have theirs).
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection

from gateway.accounting.keys import ApiKeyInfo
from gateway.errors import ApiError
from gateway.state import API_KEY_SCOPE_KEY, gateway_state

PUBLIC = "public"
ADMIN = "admin"
_SCHEMES = ("bearer", "token")


def _token(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() not in _SCHEMES or not value.strip():
        return None
    return value.strip()


def _redacted(token: str) -> str:
    return f"{token[:6]}***{token[-4:]}" if len(token) > 12 else "***"


async def require_api_key(request: Request[Any, Any, Any]) -> None:
    """App-wide; routes with ``opt={"public": True}`` are open (health, readiness, metrics)."""
    handler = request.route_handler
    if handler.opt.get(PUBLIC):
        return
    state = gateway_state(request)
    token = _token(request)
    if token is None:
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    key = await state.accounting.keys.authenticate(token)
    if key is None:
        raise ApiError(401, f"Incorrect API key provided: {_redacted(token)}.", code="invalid_api_key")
    request.scope["state"][API_KEY_SCOPE_KEY] = key
    if handler.opt.get(ADMIN) and not key.is_admin:
        raise ApiError(
            403, "This route needs an API key with the admin scope.", type="permission_error", code="forbidden"
        )


def current_key(connection: ASGIConnection[Any, Any, Any, Any]) -> ApiKeyInfo:
    key: ApiKeyInfo = connection.scope["state"][API_KEY_SCOPE_KEY]
    return key
