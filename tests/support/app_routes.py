"""The operations a gateway app serves, read from its route table: what its OpenAPI document must list."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from litestar import Litestar
from litestar.routes import HTTPRoute

from gateway.api.app import create_app
from gateway.api.dashboard import DASHBOARD_PATH
from gateway.api.openapi import DOCUMENT_PATH, complete_document
from gateway.settings import Settings
from tests.support.model_configs import scripted_model

Operation = tuple[str, str]
"""(method, path) with the path as OpenAPI spells it: ``("GET", "/admin/keys/{key_id}")``."""


def is_replicate_route(path: str) -> bool:
    """Routes of the Replicate-style API, which refuse with problem details: predictions, webhooks,
    and models addressed as ``owner/name`` (``/v1/models/{model_id}`` is OpenAI's)."""
    return path.startswith(("/v1/predictions", "/v1/webhooks")) or (
        path.startswith("/v1/models/") and path.count("/") >= 4
    )


def served_operations(app: Litestar) -> set[Operation]:
    """Every handler the app routes to, except Litestar's own ``OPTIONS`` answers, the document's route
    and the dashboard's page and files (a web page, not part of the API)."""
    operations: set[Operation] = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path_format.startswith((DOCUMENT_PATH, DASHBOARD_PATH)):
            continue
        for method, (handler, _) in route.route_handler_map.items():
            if method == "OPTIONS" and not handler.resolve_include_in_schema():
                continue
            operations.add((method, route.path_format))
    return operations


def gateway_app() -> Litestar:
    """A gateway app with one scripted model; building it starts nothing, so tests may read its
    routes and document while they are collected."""
    return create_app(Settings(models=[scripted_model("routes")]))


def gateway_document(app: Litestar) -> dict[str, Any]:
    """The document ``app`` serves at ``/openapi.json``, read without serving it."""
    return complete_document(app.openapi_schema.to_schema(), app)


def sorted_operations(operations: Iterable[Operation]) -> list[Operation]:
    return sorted(operations, key=lambda operation: (operation[1], operation[0]))
