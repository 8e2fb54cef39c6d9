"""The Litestar application, built by `create_app(settings)`; nothing happens at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException

from backends.base import Backend
from gateway.accounting.billing import AccountingMetering
from gateway.accounting.fail_closed import database_unavailable, is_database_outage
from gateway.accounting.metering import Metering
from gateway.accounting.services import ensure_initial_admin_key, initial_key_notice, open_accounting
from gateway.api.admin import ADMIN_ROUTES
from gateway.api.allow_header import complete_allow_header
from gateway.api.auth import require_api_key
from gateway.api.client_gone import CLIENT_CLOSED_REQUEST, left_before_body
from gateway.api.dashboard import DASHBOARD_ROUTES
from gateway.api.garbage import freeze_startup_objects
from gateway.api.openai.routes import OPENAI_ROUTES
from gateway.api.openapi import openapi_config
from gateway.api.probes import health, metrics, ready
from gateway.api.replicate.routes import REPLICATE_ROUTES, is_replicate_path, problem_http_error_response
from gateway.api.replicate.runner import close_predictions, open_predictions
from gateway.api.request_ids import RequestIdMiddleware, add_request_id_header
from gateway.api.usage_insights import own_budget, own_latency
from gateway.api.usage_reports import own_usage
from gateway.errors import ApiError
from gateway.observability.logs import litestar_logging_config
from gateway.observability.wiring import OBSERVABILITY_KEY, Observability
from gateway.serving.registry import ModelRegistry, build_registry
from gateway.settings import Settings
from gateway.state import STATE_KEY, GatewayState

AnyRequest = Request[Any, Any, Any]

_ERROR_TYPES = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


def _openai_api_error_response(_: AnyRequest, exc: ApiError) -> Response[Any]:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers)


def _openai_http_error_response(request: AnyRequest, exc: HTTPException) -> Response[Any]:
    if is_replicate_path(request.url.path):
        # A wrong method or an unknown path under a Replicate route is refused before routing.
        return problem_http_error_response(request, exc)
    status = exc.status_code
    if left_before_body(exc):
        status = CLIENT_CLOSED_REQUEST
        error = ApiError(status, "The client closed the connection before sending its request.")
    elif isinstance(exc, ValidationException) or status == 400:
        error = ApiError(400, str(exc.detail), code="invalid_value")
    elif status >= 500:
        error = ApiError(status, str(exc.detail), type="server_error")
    else:
        type_, code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
        detail = exc.detail
        if status == 413:
            detail = "The request body is larger than this server accepts."
        error = ApiError(status, str(detail), type=type_, code=code)
    return Response(error.body(), status_code=status, headers=dict(exc.headers or {}) | error.headers)


def _openai_unexpected_error_response(request: AnyRequest, exc: Exception) -> Response[Any]:
    if is_database_outage(exc):
        # Admin and usage routes read the database directly: its absence is a 503, not a bug.
        request.logger.warning("database unavailable: %s", type(exc).__name__)
        error = database_unavailable()
        return Response(error.body(), status_code=error.status, headers=error.headers)
    request.logger.exception("unhandled error", exc_info=exc)
    error = ApiError(500, "The server had an error while processing your request.", type="server_error")
    return Response(error.body(), status_code=500)


def create_app(
    settings: Settings,
    *,
    backends: Mapping[str, Backend] | None = None,
    metering: Metering | None = None,
    freeze_garbage: bool = False,
) -> Litestar:
    """Build the gateway app. ``backends`` replaces engines by model name (tests, benchmarks);
    ``freeze_garbage`` sets the garbage collector for a process that only serves this app."""
    registry: ModelRegistry = build_registry(settings.models, dict(backends or {}), settings.weights_dir())
    state = GatewayState(settings=settings, models=registry)
    if metering is not None:
        state.metering = metering
    observability = Observability(settings, state)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        accounting = await open_accounting(settings)
        try:
            state.accounting = accounting
            if metering is None:
                state.metering = AccountingMetering(accounting)
            first_key = await ensure_initial_admin_key(accounting, settings.initial_admin_key)
            if first_key is not None:
                model = next(iter(registry)).name
                base_url = f"http://{settings.host}:{settings.port}"
                print(initial_key_notice(first_key, base_url, model), flush=True)
            await registry.start()
            await open_predictions(app)
            if freeze_garbage:
                freeze_startup_objects()
            state.ready = True
            try:
                yield
            finally:
                state.ready = False
                # Predictions run in the background: finish (and bill) them before engines stop.
                await close_predictions(app)
                await registry.stop()
        finally:
            await accounting.aclose()

    return Litestar(
        route_handlers=[
            health,
            ready,
            metrics,
            *OPENAI_ROUTES,
            REPLICATE_ROUTES,
            ADMIN_ROUTES,
            own_usage,
            own_latency,
            own_budget,
            DASHBOARD_ROUTES,
        ],
        middleware=[RequestIdMiddleware, *observability.middleware],
        before_request=require_api_key,
        before_send=[add_request_id_header, complete_allow_header],
        exception_handlers={
            ApiError: _openai_api_error_response,
            HTTPException: _openai_http_error_response,
            Exception: _openai_unexpected_error_response,
        },
        lifespan=[lifespan, observability.lifespan],
        state=State({STATE_KEY: state, OBSERVABILITY_KEY: observability}),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=openapi_config(),
        logging_config=litestar_logging_config(),
    )
