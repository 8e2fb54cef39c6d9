"""The gateway's OpenAPI 3.1 document, served without a key at ``GET /openapi.json``.

Litestar documents what handler signatures show: paths, path parameters, return types. The
routes read their bodies and most query strings themselves (so that every malformed value is
answered in the API's own error shape), so this module adds what signatures cannot show: request
bodies drawn from the same msgspec structs that decode them, the query parameters the handlers
read, the OpenAI response objects, and on every authenticated operation the errors it answers, in
OpenAI's envelope or, on the Replicate-style routes, as problem details.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any, Literal

import msgspec
from litestar import Litestar, Request, Router
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.routes import HTTPRoute
from litestar.serialization import encode_json

from gateway.accounting.keys import KeyUpdate, NewKey
from gateway.accounting.usage import BUCKETS, GROUPINGS
from gateway.api.auth import PUBLIC
from gateway.api.openai.request_bodies import ChatCompletionRequest, CompletionRequest
from gateway.api.replicate.problems import PROBLEM_MEDIA_TYPE, Problem
from gateway.api.replicate.versions import openapi_schema as prediction_version_schema

DOCUMENT_PATH = "/openapi.json"
SECURITY_SCHEME = "bearer"
_REF = "#/components/schemas/{name}"
# What an authenticated operation may answer besides success. 500 is not listed: it is a bug.
_ERRORS = {
    400: "The request is malformed or a value is out of range.",
    401: "No API key, or not a valid one.",
    403: "The key may not use this route or model.",
    404: "The model, key or prediction does not exist.",
    413: "The request body is larger than the server accepts.",
    422: "The request is well-formed but cannot be served.",
    429: "A rate limit or budget of the key is exhausted; retry after Retry-After seconds.",
    503: "The model's queue is full or the gateway is shutting down; retry after Retry-After seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error envelope, answered by the OpenAI-compatible, admin and usage routes."""

    error: ErrorDetail


class ProblemField(msgspec.Struct):
    type: str
    field: str
    description: str


class ProblemDetails(msgspec.Struct):
    """RFC 7807 problem details, answered by the Replicate-style routes (``invalid_fields`` on 422)."""

    title: str
    detail: str
    status: int
    invalid_fields: list[ProblemField] | msgspec.UnsetType = msgspec.UNSET


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(msgspec.Struct):
    """A whole chat completion; with ``"stream": true`` the same arrives as server-sent chunks."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"] | None


class TextCompletion(msgspec.Struct):
    """A whole legacy completion; with ``"stream": true`` the same arrives as server-sent chunks."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[TextChoice]
    usage: Usage


# The structs the handlers decode bodies with, and what the OpenAI routes answer, as schemas.
_STRUCTS = (ChatCompletionRequest, CompletionRequest, NewKey, KeyUpdate, ChatCompletion, TextCompletion)
# Bodies the handlers read themselves, by (method, path): the name of their schema.
_REQUEST_BODIES: Mapping[tuple[str, str], str] = {
    ("POST", "/v1/chat/completions"): ChatCompletionRequest.__name__,
    ("POST", "/v1/completions"): CompletionRequest.__name__,
    ("POST", "/admin/keys"): NewKey.__name__,
    ("PATCH", "/admin/keys/{key_id}"): KeyUpdate.__name__,
    ("POST", "/v1/predictions"): "PredictionRequest",
    ("POST", "/v1/models/{owner}/{name}/predictions"): "ModelPredictionRequest",
}
# Fields the structs default (so that leaving one out gets OpenAI's own message) and the handlers require.
_REQUIRED_BY_HANDLERS = {ChatCompletionRequest.__name__: ("messages",), CompletionRequest.__name__: ("prompt",)}
_RESPONSES: Mapping[tuple[str, str], str] = {
    ("POST", "/v1/chat/completions"): ChatCompletion.__name__,
    ("POST", "/v1/completions"): TextCompletion.__name__,
}
_USAGE_FILTERS = (
    ("model", {"type": "string"}, "Only this model's requests."),
    ("since", {"type": "string"}, "Inclusive start: an ISO date (its UTC midnight), an ISO date-time or Unix seconds."),
    ("until", {"type": "string"}, "Exclusive end, in the same forms as since."),
    ("group_by", {"type": "string", "enum": list(GROUPINGS)}, "How rows are grouped (days and hours are UTC)."),
    ("key", {"type": "string"}, "Only this key's requests (an id)."),
)
_USAGE_QUERY = (
    *_USAGE_FILTERS,
    ("bucket", {"type": "string", "enum": list(BUCKETS)}, "Split every group by the UTC hour or day."),
    ("format", {"type": "string", "enum": ["json", "csv"]}, "csv: what 'llama-gateway usage report' prints."),
)
_QUERY_PARAMETERS: Mapping[tuple[str, str], tuple[tuple[str, dict[str, Any], str], ...]] = {
    ("GET", "/v1/usage"): _USAGE_QUERY,
    ("GET", "/admin/usage"): _USAGE_QUERY,
    ("GET", "/v1/usage/latency"): _USAGE_FILTERS,
    ("GET", "/admin/usage/latency"): _USAGE_FILTERS,
    ("GET", "/admin/keys"): (("include_revoked", {"type": "boolean"}, "List revoked keys too."),),
}
_USAGE_REPORTS = {("GET", "/v1/usage"), ("GET", "/admin/usage")}


def openapi_config() -> OpenAPIConfig:
    """The document's settings for ``create_app``: served at ``/openapi.json``, open to everyone."""
    return OpenAPIConfig(
        title="llama-gateway",
        version=version("llama-gateway"),
        description="OpenAI-compatible chat and text completions, Replicate-style predictions, API keys and usage.",
        security=[{SECURITY_SCHEME: []}],
        components=Components(
            security_schemes={
                SECURITY_SCHEME: SecurityScheme(
                    type="http", scheme="bearer", description="An API key: 'Authorization: Bearer sk-...'."
                )
            }
        ),
        # The router's path is the document's: the router also gets Litestar's catch-all for unknown
        # documentation pages, which must not shadow the API's own 404 for unknown paths.
        openapi_router=Router(DOCUMENT_PATH, route_handlers=[], include_in_schema=False, opt={PUBLIC: True}),
        render_plugins=[_GatewayDocument()],
    )


class _GatewayDocument(JsonRenderPlugin):
    """Litestar's JSON document completed by ``complete_document``, built on the first request."""

    def __init__(self) -> None:
        # Served at the router's own path; listing "/openapi.json" too names this the JSON handler,
        # so that Litestar adds no second, incomplete one.
        super().__init__(path=["/", DOCUMENT_PATH])
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = encode_json(complete_document(openapi_schema, request.app))
        return self._rendered


def complete_document(document: Mapping[str, Any], app: Litestar) -> dict[str, Any]:
    """``document`` (Litestar's) with bodies, query parameters, responses and errors added."""
    completed = copy.deepcopy(dict(document))
    schemas: dict[str, Any] = completed.setdefault("components", {}).setdefault("schemas", {})
    _add_schemas(schemas)
    paths: dict[str, Any] = completed.get("paths", {})
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path_format not in paths:
            continue
        for method, (handler, _) in route.route_handler_map.items():
            operation = paths[route.path_format].get(method.lower())
            if operation is None:
                continue
            key = (method, route.path_format)
            if key in _REQUEST_BODIES:
                operation["requestBody"] = _json_body(_ref(_REQUEST_BODIES[key]))
            if query := _query(key):
                operation["parameters"] = [*operation.get("parameters", []), *query]
            if key in _RESPONSES:
                operation["responses"]["200"] = _completion_response(_RESPONSES[key])
            if key in _USAGE_REPORTS:
                operation["responses"]["200"] = _usage_report_response()
            if handler.opt.get(PUBLIC):
                operation["security"] = []
                continue
            problems = Problem in handler.resolve_exception_handlers()
            # Only a route that reads a body can find it too large.
            statuses = [s for s in _ERRORS if s != 413 or key in _REQUEST_BODIES]
            errors = {str(status): _error_response(status, problems) for status in statuses}
            operation["responses"] = {**operation["responses"], **errors}
    return completed


def _add_schemas(schemas: dict[str, Any]) -> None:
    _, components = msgspec.json.schema_components([*_STRUCTS, ErrorResponse, ProblemDetails], ref_template=_REF)
    for name, fields in _REQUIRED_BY_HANDLERS.items():
        components[name]["required"] = [*components[name].get("required", []), *fields]
        for field in fields:
            components[name]["properties"][field].pop("default", None)
    components[ChatCompletionRequest.__name__]["properties"]["messages"]["minItems"] = 1
    version_schemas = prediction_version_schema()["components"]["schemas"]
    components["PredictionInput"] = version_schemas["Input"]
    components["PredictionRequest"] = _prediction_request(required=("version", "input"))
    components["ModelPredictionRequest"] = _prediction_request(required=("input",))
    for name, schema in components.items():
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r} in the OpenAPI document")


def _prediction_request(*, required: tuple[str, ...]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "input": {"$ref": _REF.format(name="PredictionInput")},
        "stream": {"type": "boolean", "description": "Accepted for compatibility; urls.stream is always given."},
    }
    if "version" in required:
        properties["version"] = {
            "type": "string",
            "description": "A model name, an alias, or owner/name:version.",
        }
    return {"type": "object", "required": list(required), "properties": properties}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _query(key: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": description}
        for name, schema, description in _QUERY_PARAMETERS.get(key, ())
    ]


def _completion_response(name: str) -> dict[str, Any]:
    return {
        "description": "The completion; with stream set, server-sent events of chunks ending in 'data: [DONE]'.",
        "content": {
            "application/json": {"schema": _ref(name)},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }


def _usage_report_response() -> dict[str, Any]:
    return {
        "description": "The usage report; with format=csv, the same rows as CSV.",
        "content": {"application/json": {"schema": {"type": "object"}}, "text/csv": {"schema": {"type": "string"}}},
    }


def _error_response(status: int, problem: bool) -> dict[str, Any]:
    media_type, schema = (PROBLEM_MEDIA_TYPE, "ProblemDetails") if problem else ("application/json", "ErrorResponse")
    response: dict[str, Any] = {"description": _ERRORS[status], "content": {media_type: {"schema": _ref(schema)}}}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response
