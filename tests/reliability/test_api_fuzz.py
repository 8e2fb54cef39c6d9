"""The HTTP API under generated requests, driven by the gateway's own served ``/openapi.json``.

Three kinds of requests go to a real gateway on loopback, with a key, for every documented
operation of the OpenAI, admin, usage and prediction APIs:

- schemathesis's: requests that fit the document and requests that break it, with the ids of a
  real key, prediction and model mixed in so that they get past "not found";
- edge values: a request the gateway accepts, with one body field or query parameter at a time
  replaced by a value at the edge of what its type holds (64-bit overflows, exponents past any
  float, the calendar's first and last day in far-off zones, strings that are not UTF-8, arrays
  nested ten thousand deep);
- bodies no schema describes: bytes that are not JSON or not UTF-8, and accepted JSON sent as
  text or as a form (which must be refused, never parsed as JSON anyway).

Every path is also asked ``OPTIONS`` and a method it does not serve. Whatever arrives, the gateway
answers without a server error (503 only with ``Retry-After``), within a deadline, and refuses in
the shape of the API asked: OpenAI's error envelope, or Replicate's problem details on the
prediction routes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from gateway.settings import Settings
from tests.support.app_routes import (
    Operation,
    gateway_app,
    gateway_document,
    is_replicate_route,
    served_operations,
    sorted_operations,
)
from tests.support.gateways import bearer, create_key
from tests.support.live import LiveGateway, running_gateway
from tests.support.model_configs import scripted_model

MODEL = "llama-2-7b-chat"
# A scripted reply takes milliseconds; an answer this late is a hang.
REQUEST_TIMEOUT_S = 20
EXAMPLES = 50
LONG_EXAMPLES = 1000
PROBES = {"/health", "/ready", "/metrics"}

_APP = gateway_app()
_DOCUMENT = gateway_document(_APP)
# From the app's routes, so that a route missing from the document fails here too.
OPERATIONS = sorted_operations(op for op in served_operations(_APP) if op[1] not in PROBES)
PATHS = sorted({path for _, path in OPERATIONS})


def _documented(operation: Operation) -> dict[str, Any]:
    method, path = operation
    documented: dict[str, Any] = _DOCUMENT["paths"].get(path, {}).get(method.lower(), {})
    return documented


WITH_BODIES = [op for op in OPERATIONS if "requestBody" in _documented(op)]
WITH_QUERIES = [op for op in OPERATIONS if any(p["in"] == "query" for p in _documented(op).get("parameters", []))]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PROBLEM_FIELDS = {"title", "detail", "status"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def _nested(depth: int, inside: bytes = b"1") -> bytes:
    return b"[" * depth + inside + b"]" * depth


# JSON texts put in place of one field of an accepted body.
EDGE_JSON: tuple[bytes, ...] = (
    b"0",
    b"-1",
    b"1.5",
    b"2147483648",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1e999",
    b"-1e999",
    b"5e-324",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b'""',
    b'"1e999"',
    b'"NaN"',
    b'"-Infinity"',
    b'"9999-12-31T23:59:59-23:59"',
    b'"0001-01-01T00:00:00+23:59"',
    b'"\xff\xfe not UTF-8"',
    b'"\\ud800"',
    b'"' + b"x" * 100_000 + b'"',
    _nested(10_000),
    b'{"a": ' * 10_000 + b"1" + b"}" * 10_000,
)
# Query values put in place of one parameter of an accepted request.
EDGE_QUERY = (
    "",
    "-1",
    "1e999",
    "9223372036854775808",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "0001-01-01",
    "9999-12-31",
    "-62135596800",
    "253402300800",
    "\x00",
    "x" * 5000,
)
# Bodies that are not a JSON object in UTF-8, sent as JSON or with no media type.
NOT_JSON_BODIES: tuple[bytes, ...] = (
    b"",
    b" ",
    b"\xff\xfe\xfd",
    b'{"model": "\xff", "name": "\xc3"}',
    b"not json",
    b'{"model": ',
    b"\x00",
    b"name=x&rpm=1",
    b"[]",
    b"1e999",
    _nested(100_000),
)
# Media types that are not JSON: a body sent with one is refused, never parsed as JSON anyway.
NOT_JSON = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml")
_EDGE_MARK = "__edge_value__"

# The document types money as a decimal string; generated ones should mostly be amounts.
schemathesis.openapi.format("decimal", st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str))


@dataclass(frozen=True)
class Target:
    live: LiveGateway
    user_key: str

    def headers(self, path: str) -> dict[str, str]:
        """The admin key on admin routes (a user key stops at 403 there), a user key elsewhere."""
        return bearer(self.live.admin_key if path.startswith("/admin/") else self.user_key)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("api-fuzz")
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{directory / 'gateway.db'}",
        data_dir=str(directory),
        models=[scripted_model(MODEL, max_concurrency=8, max_queue=64, reply="Fuzzed reply.")],
        log_level="warning",
    )
    with running_gateway(settings) as live:
        _, user_key = create_key(live, name="fuzzing user")
        yield Target(live, user_key)


@pytest.fixture(scope="module")
def api(target: Target) -> schemathesis.BaseSchema:
    """The served document, generating with the ids of a key, a prediction and the model that exist."""
    key_id, _ = create_key(target.live, name="fuzzed key")
    created = httpx.post(
        f"{target.live.base_url}/v1/predictions",
        json={"version": MODEL, "input": {"prompt": "Hello"}},
        headers=target.headers("/v1/predictions"),
        timeout=REQUEST_TIMEOUT_S,
    )
    assert created.status_code == 201, created.text
    known = {"model": [MODEL], "key": [key_id], "prediction": [created.json()["id"]]}
    bindings = {
        "known-model": ("path.model_id", "path.name", "path.version", "body.model", "body.version"),
        "known-key": ("path.key_id",),
        "known-prediction": ("path.prediction_id",),
    }
    config = schemathesis.Config.from_dict(
        {
            "dictionaries": {f"known-{name}": {"values": values} for name, values in known.items()},
            # The key goes in every request; breaking it would stop them all at 401.
            "generation": {"with-security-parameters": False},
            "parameters": {
                parameter: {"dictionary": dictionary, "probability": 0.5}
                for dictionary, parameters in bindings.items()
                for parameter in parameters
            },
        }
    )
    return schemathesis.openapi.from_url(f"{target.live.base_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def http(target: Target) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=target.live.base_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


def fuzz_settings(examples: int) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def answer_problem(path: str, status: int, headers: Mapping[str, str], content: bytes) -> str | None:
    """What is wrong with an answer: a server error (503 is one without Retry-After), or a
    refusal not in the shape of the route's API; None when nothing is."""
    if status >= 500 and not (status == 503 and headers.get("retry-after")):
        return "server error"
    if status < 400:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        return "the refusal is not JSON"
    if is_replicate_route(path):
        if not (isinstance(body, dict) and set(body) >= PROBLEM_FIELDS and body["status"] == status):
            return "the refusal is not problem details"
        if not headers.get("content-type", "").startswith("application/problem+json"):
            return "problem details not sent as application/problem+json"
        return None
    error = body.get("error") if isinstance(body, dict) and set(body) == {"error"} else None
    if not (isinstance(error, dict) and set(error) == ERROR_FIELDS and isinstance(error["message"], str)):
        return "the refusal is not an OpenAI error"
    return None


def response_problem(path: str, response: httpx.Response) -> str | None:
    """``answer_problem`` with the request and answer that show it, for a failure message."""
    problem = answer_problem(path, response.status_code, response.headers, response.content)
    if problem is None:
        return None
    request = response.request
    return f"{problem}: {request.method} {request.url} {request.content[:200]!r} -> {response.content[:300]!r}"


def _reaching_the_model(path: str) -> st.SearchStrategy[dict[str, Any]] | None:
    """Fields that make a generated completion request one the model serves, so that its other
    fields get as far as a generation."""
    text = st.text(min_size=1, max_size=200)
    if path == "/v1/chat/completions":
        return text.map(lambda content: {"model": MODEL, "messages": [{"role": "user", "content": content}]})
    if path == "/v1/completions":
        return text.map(lambda prompt: {"model": MODEL, "prompt": prompt})
    return None


def _with_fields(case: Case, fields: dict[str, Any]) -> Case:
    case.body = {**case.body, **fields}
    return case


def positive_cases(api: schemathesis.BaseSchema, operation: Operation) -> st.SearchStrategy[Case]:
    method, path = operation
    positive = api[path][method].as_strategy(generation_mode=GenerationMode.POSITIVE)
    reaching = _reaching_the_model(path)
    if reaching is None:
        return positive
    return st.one_of(positive, st.tuples(positive, reaching).map(lambda drawn: _with_fields(*drawn)))


def generated_cases(api: schemathesis.BaseSchema, operation: Operation) -> st.SearchStrategy[Case]:
    method, path = operation
    # One run over both modes: an operation with nothing to break (a lone string in the path) has
    # no invalid cases, and its valid ones still run.
    negative = api[path][method].as_strategy(generation_mode=GenerationMode.NEGATIVE)
    return st.one_of(positive_cases(api, operation), negative)


def check_generated(api: schemathesis.BaseSchema, target: Target, operation: Operation, examples: int) -> None:
    path = operation[1]

    @hypothesis.given(case=generated_cases(api, operation))
    @fuzz_settings(examples)
    def answered_well(case: Case) -> None:
        response = case.call(headers=target.headers(path), timeout=REQUEST_TIMEOUT_S)
        headers = {name: values[0] for name, values in response.headers.items()}
        problem = answer_problem(path, response.status_code, headers, response.content)
        sent = (response.request.body or b"")[:300]
        assert problem is None, (
            f"{problem}: {case.method} {response.request.url} {sent!r} -> {response.content[:300]!r}"
        )

    answered_well()


class AcceptedCases:
    """For each operation, a generated request that the gateway accepts (2xx): the base that edge
    values and foreign bodies are put into. Found once per operation, without shrinking (each try is
    a request)."""

    def __init__(self, api: schemathesis.BaseSchema, target: Target) -> None:
        self._api = api
        self._target = target
        self._found: dict[Operation, Case] = {}

    def __getitem__(self, operation: Operation) -> Case:
        if operation not in self._found:
            path = operation[1]

            def accepted(case: Case) -> bool:
                response = case.call(headers=self._target.headers(path), timeout=REQUEST_TIMEOUT_S)
                return bool(response.status_code < 300)

            settings = hypothesis.settings(fuzz_settings(500), phases=[hypothesis.Phase.generate])
            self._found[operation] = hypothesis.find(positive_cases(self._api, operation), accepted, settings=settings)
        return self._found[operation]


@pytest.fixture(scope="module")
def accepted(api: schemathesis.BaseSchema, target: Target) -> AcceptedCases:
    return AcceptedCases(api, target)


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = _DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def body_fields(operation: Operation) -> list[tuple[str, ...]]:
    """The documented fields of an operation's body, and those of its objects one level down (a prediction's input)."""
    schema = _resolved(_documented(operation)["requestBody"]["content"]["application/json"]["schema"])
    fields: list[tuple[str, ...]] = []
    for name, field in schema.get("properties", {}).items():
        fields.append((name,))
        fields.extend((name, inner) for inner in _resolved(field).get("properties", {}))
    return fields


def query_parameters(operation: Operation) -> list[str]:
    return [p["name"] for p in _documented(operation).get("parameters", []) if p["in"] == "query"]


def with_edge_value(body: object, field: tuple[str, ...], value: bytes) -> bytes:
    """``body`` as JSON with ``field`` set to the JSON text ``value`` (which need not be valid JSON)."""
    edited: dict[str, Any] = json.loads(json.dumps(body)) if isinstance(body, dict) else {}
    holder = edited
    for name in field[:-1]:
        if not isinstance(holder.get(name), dict):
            holder[name] = {}
        holder = holder[name]
    holder[field[-1]] = _EDGE_MARK
    return json.dumps(edited).encode().replace(json.dumps(_EDGE_MARK).encode(), value)


def check_edge_values(http: httpx.Client, base: Case, target: Target, operation: Operation) -> None:
    method, path = operation
    headers = target.headers(path)
    problems: list[str | None] = []
    if "requestBody" in _documented(operation):
        json_headers = headers | {"Content-Type": "application/json"}
        for field in body_fields(operation):
            for value in EDGE_JSON:
                content = with_edge_value(base.body, field, value)
                response = http.request(
                    method, base.formatted_path, params=base.query, content=content, headers=json_headers
                )
                problems.append(response_problem(path, response))
    for name in query_parameters(operation):
        for text in EDGE_QUERY:
            params = {**(base.query or {}), name: text}
            response = http.request(
                method, base.formatted_path, params=params, content=_json_bytes(base), headers=headers
            )
            problems.append(response_problem(path, response))
    found = [problem for problem in problems if problem is not None]
    assert not found, f"{len(found)} of {len(problems)} answers were wrong:\n" + "\n".join(found[:20])


def _json_bytes(case: Case) -> bytes | None:
    return None if case.body is None or not isinstance(case.body, (dict, list)) else json.dumps(case.body).encode()


def check_bodies_that_are_not_json(http: httpx.Client, base: Case, target: Target, operation: Operation) -> None:
    method, path = operation
    headers = target.headers(path)
    problems: list[str | None] = []
    for media_type in (None, "application/json"):
        sent_as = headers | ({"Content-Type": media_type} if media_type else {})
        for content in NOT_JSON_BODIES:
            response = http.request(method, base.formatted_path, params=base.query, content=content, headers=sent_as)
            problems.append(response_problem(path, response))
    # The accepted body itself, under a media type that is not JSON: refused, not read as JSON anyway.
    for media_type in NOT_JSON:
        sent_as = headers | {"Content-Type": media_type}
        response = http.request(
            method, base.formatted_path, params=base.query, content=_json_bytes(base), headers=sent_as
        )
        problems.append(response_problem(path, response))
        if response.status_code < 400:
            problems.append(f"a {media_type} body was read as JSON: {response.status_code} {response.text[:200]}")
    found = [problem for problem in problems if problem is not None]
    assert not found, f"{len(found)} wrong answers:\n" + "\n".join(found[:20])


def check_methods(http: httpx.Client, target: Target, path: str) -> None:
    """``OPTIONS`` lists the documented methods, and any other method is a 405 that lists them too."""
    documented = {method.upper() for method in _DOCUMENT["paths"][path]}
    allowed = documented | {"OPTIONS"}
    url = re.sub(r"\{[^}]+\}", "fuzz", path)
    options = http.options(url, headers=target.headers(path))
    assert options.status_code in (200, 204), options.text
    assert _methods(options.headers.get("allow")) == allowed, f"OPTIONS {url}: {options.headers}"
    for method in sorted(set(METHODS) - documented):
        response = http.request(method, url, headers=target.headers(path))
        assert response.status_code == 405, f"{method} {url} -> {response.status_code}"
        assert _methods(response.headers.get("allow")) == allowed, f"{method} {url}: {response.headers}"
        problem = response_problem(path, response)
        assert problem is None, problem


def _methods(allow: str | None) -> set[str]:
    return {method.strip().upper() for method in (allow or "").split(",") if method.strip()}


@pytest.mark.parametrize("operation", OPERATIONS, ids=" ".join)
def test_generated_requests_are_answered_without_server_errors_in_the_api_shape(
    api: schemathesis.BaseSchema, target: Target, operation: Operation
) -> None:
    check_generated(api, target, operation, EXAMPLES)


@pytest.mark.parametrize("operation", sorted_operations({*WITH_BODIES, *WITH_QUERIES}), ids=" ".join)
def test_edge_values_in_any_field_are_answered_without_server_errors_in_the_api_shape(
    http: httpx.Client, accepted: AcceptedCases, target: Target, operation: Operation
) -> None:
    check_edge_values(http, accepted[operation], target, operation)


@pytest.mark.parametrize("operation", WITH_BODIES, ids=" ".join)
def test_bodies_that_are_not_json_objects_are_refused_in_the_api_shape(
    http: httpx.Client, accepted: AcceptedCases, target: Target, operation: Operation
) -> None:
    check_bodies_that_are_not_json(http, accepted[operation], target, operation)


@pytest.mark.parametrize("path", PATHS)
def test_options_and_unsupported_methods_name_the_documented_methods(
    http: httpx.Client, target: Target, path: str
) -> None:
    check_methods(http, target, path)


@pytest.mark.long
@pytest.mark.parametrize("operation", OPERATIONS, ids=" ".join)
def test_many_generated_requests_are_answered_without_server_errors_in_the_api_shape(
    api: schemathesis.BaseSchema, target: Target, operation: Operation
) -> None:
    check_generated(api, target, operation, LONG_EXAMPLES)
