"""The OpenAPI document at ``/openapi.json``: open without a key, valid OpenAPI 3.1, and listing every
route the app serves with the body its handler decodes, what it answers, and its errors in the shape
of its API (OpenAI's envelope, or problem details on the Replicate-style routes)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import schemathesis

from gateway.accounting.keys import KeyUpdate, NewKey
from gateway.api.openai.request_bodies import ChatCompletionRequest, CompletionRequest
from gateway.settings import Settings
from tests.support.app_routes import gateway_app, is_replicate_route, served_operations
from tests.support.gateways import bearer
from tests.support.live import LiveGateway, running_gateway
from tests.support.model_configs import scripted_model

MODEL = "llama-2-7b-chat"
PUBLIC_PATHS = {"/health", "/ready", "/metrics"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
ERROR_STATUSES = ("400", "401", "403", "404", "422", "429", "503")
# Actions whose handlers read no body; every other POST or PATCH documents the body it decodes.
BODILESS_ACTIONS = {("POST", "/admin/keys/{key_id}/revoke"), ("POST", "/v1/predictions/{prediction_id}/cancel")}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    directory = tmp_path_factory.mktemp("openapi")
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{directory / 'gateway.db'}",
        data_dir=str(directory),
        models=[scripted_model(MODEL, reply="Documented.")],
        log_level="warning",
    )
    with running_gateway(settings) as served:
        yield served


@pytest.fixture(scope="module")
def document(live: LiveGateway) -> dict[str, Any]:
    response = httpx.get(f"{live.base_url}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    served: dict[str, Any] = response.json()
    return served


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, operation


def validate(document: dict[str, Any], schema_name: str, instance: object) -> None:
    """Validate ``instance`` against a schema of the document, its references resolved in the document."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_the_document_is_served_without_a_key_and_the_api_still_needs_one(live: LiveGateway) -> None:
    response = httpx.get(f"{live.base_url}/openapi.json", timeout=30)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/vnd.oai.openapi+json")
    document = response.json()
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"] == "llama-gateway"
    assert document["info"]["version"] == version("llama-gateway")
    assert httpx.get(f"{live.base_url}/v1/models", timeout=30).status_code == 401


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    schemathesis.openapi.from_dict(document).validate()  # raises on a document the 3.1 meta-schema refuses
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_route_the_app_serves_is_documented(document: dict[str, Any]) -> None:
    documented = {(method, path) for method, path, _ in operations(document)}

    assert documented == served_operations(gateway_app())


def test_every_operation_that_reads_a_body_documents_it(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        if method in ("POST", "PUT", "PATCH"):
            has_body = (method, path) not in BODILESS_ACTIONS
            assert ("requestBody" in operation) == has_body, f"{method} {path}"


@pytest.mark.parametrize(
    ("method", "path", "struct"),
    [
        ("POST", "/v1/chat/completions", ChatCompletionRequest),
        ("POST", "/v1/completions", CompletionRequest),
        ("POST", "/admin/keys", NewKey),
        ("PATCH", "/admin/keys/{key_id}", KeyUpdate),
    ],
)
def test_bodies_are_documented_from_the_structs_that_decode_them(
    document: dict[str, Any], method: str, path: str, struct: type[msgspec.Struct]
) -> None:
    body = document["paths"][path][method.lower()]["requestBody"]
    name = struct.__name__

    assert body["required"] is True
    assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    schema = document["components"]["schemas"][name]
    assert set(schema["properties"]) == set(struct.__struct_fields__)
    _, components = msgspec.json.schema_components([struct], ref_template="#/components/schemas/{name}")
    for field, definition in components[name]["properties"].items():
        documented = dict(schema["properties"][field])
        documented.pop("minItems", None)  # what the handler adds to the struct's own rules
        assert documented.items() <= definition.items(), field


def test_the_openai_routes_require_what_openai_requires(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]

    assert {"model", "messages"} <= set(schemas["ChatCompletionRequest"]["required"])
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert {"model", "prompt"} <= set(schemas["CompletionRequest"]["required"])


def test_every_operation_documents_its_key_and_its_errors_in_its_apis_shape(document: dict[str, Any]) -> None:
    assert document["security"] == [{"bearer": []}]
    scheme = document["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in operations(document):
        if path in PUBLIC_PATHS:
            assert operation["security"] == [], path
            continue
        media_type, schema = (
            ("application/problem+json", "ProblemDetails")
            if is_replicate_route(path)
            else ("application/json", "ErrorResponse")
        )
        for status in ERROR_STATUSES:
            content = operation["responses"][status]["content"]
            assert content == {media_type: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}, (method, path)
        for status in ("429", "503"):
            assert "Retry-After" in operation["responses"][status]["headers"], (method, path)


def test_what_the_gateway_answers_fits_what_the_document_says(document: dict[str, Any], live: LiveGateway) -> None:
    key = bearer(live.admin_key)
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        chat = client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]},
            headers=key,
        )
        text = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello"}, headers=key)
        bad_request = client.post("/v1/chat/completions", json={"model": MODEL}, headers=key)
        no_key = client.get("/admin/keys")
        no_prediction = client.get("/v1/predictions/none", headers=key)
        invalid_input = client.post("/v1/predictions", json={"version": MODEL, "input": {}}, headers=key)

    assert chat.status_code == 200, chat.text
    validate(document, "ChatCompletion", chat.json())
    assert text.status_code == 200, text.text
    validate(document, "TextCompletion", text.json())
    for refusal, status in ((bad_request, 400), (no_key, 401)):
        assert refusal.status_code == status, refusal.text
        assert refusal.headers["content-type"].startswith("application/json")
        validate(document, "ErrorResponse", refusal.json())
    for problem, status in ((no_prediction, 404), (invalid_input, 422)):
        assert problem.status_code == status, problem.text
        assert problem.headers["content-type"].startswith("application/problem+json")
        validate(document, "ProblemDetails", problem.json())
