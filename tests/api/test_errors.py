"""Every error answered in OpenAI's envelope, raising the OpenAI SDK's matching exception class;
the models routes; and the queue that refuses work with 503 instead of piling it up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from backends.base import GenerationFailed, GenerationRequest, TokenDelta
from backends.scripted import ScriptedBackend
from tests.support.model_configs import scripted_model
from tests.support.served import Served, serve, sse_payloads

ECHO = "echo"
BUSY = "busy"
QUEUED = "queued"
BROKEN = "broken"
SMALL_CONTEXT = 64
MAX_BODY = 4096
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]


class CrashingAfterTwoTokensBackend(ScriptedBackend):
    """Two tokens, then the engine fails."""

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        yield TokenDelta("Hello", (1,))
        yield TokenDelta(" there", (2,))
        raise GenerationFailed("the engine fell over")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    slow = {"token_delay_ms": 20, "end_with_eos": False}
    models = [
        scripted_model(ECHO, max_concurrency=8, context_length=SMALL_CONTEXT),
        scripted_model(BUSY, max_concurrency=1, max_queue=0, **slow),
        scripted_model(QUEUED, max_concurrency=1, max_queue=1, **slow),
        scripted_model(BROKEN),
    ]
    backends = {BROKEN: CrashingAfterTwoTokensBackend(max_concurrency=1)}
    with serve(tmp_path_factory, models, backends=backends, max_body_bytes=MAX_BODY) as gateway:
        yield gateway


def assert_envelope(error: openai.APIStatusError, status: int, *, param: str | None, code: str | None) -> None:
    assert error.status_code == status
    assert error.request_id is not None
    assert error.request_id.startswith("req_")
    body = error.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert error.param == param
    assert error.code == code


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": "many"}, "max_completion_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": "Hello!"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, "messages.[0].role"),
        ({"messages": [{"content": "Hi"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"messages": [{"role": "user"}]}, "messages.[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.[0].content",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_invalid_chat_request(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"messages": HELLO, "max_tokens": 5} | fields
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=ECHO, messages=messages, extra_body=body)
    assert_envelope(raised.value, 400, param=param, code=raised.value.code)
    assert raised.value.type == "invalid_request_error"


def test_error_before_a_stream_is_plain_json(http: httpx.Client) -> None:
    response = http.post("/chat/completions", json={"model": ECHO, "messages": HELLO, "stream": True, "temperature": 9})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == "temperature"


def test_unknown_fields_are_ignored(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=ECHO,
        messages=HELLO,
        max_tokens=3,
        metadata={"team": "search"},
        extra_body={"foo": 1, "bar": {"baz": [1, 2]}},
    )
    assert completion.choices[0].message.content == "Hello from the"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": ECHO}, "messages"),
    ],
)
def test_missing_required_field(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("body", [b"{not json", b'{"model": "echo",', b"[1, 2]", b'"text"', b""])
def test_malformed_json(http: httpx.Client, body: bytes) -> None:
    response = http.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert response.headers["x-request-id"]


def test_prompt_longer_than_context(client: openai.OpenAI) -> None:
    long = "word " * (2 * SMALL_CONTEXT)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=ECHO, messages=[{"role": "user", "content": long}])
    assert_envelope(raised.value, 400, param="messages", code="context_length_exceeded")
    assert f"maximum context length is {SMALL_CONTEXT} tokens" in raised.value.message


def test_prompt_plus_max_tokens_longer_than_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=ECHO, messages=HELLO, max_tokens=SMALL_CONTEXT)
    assert_envelope(raised.value, 400, param="messages", code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=ECHO, prompt="word " * (2 * SMALL_CONTEXT))
    assert raised.value.code == "context_length_exceeded"


def test_body_over_the_limit(http: httpx.Client, client: openai.OpenAI) -> None:
    big = [{"role": "user", "content": "x" * MAX_BODY}]
    response = http.post("/chat/completions", json={"model": ECHO, "messages": big})
    assert response.status_code == 413
    assert response.headers["x-request-id"]
    assert response.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=ECHO, messages=big)  # type: ignore[arg-type]
    assert_envelope(raised.value, 413, param=None, code="request_too_large")


def test_invalid_api_key(served: Served, http: httpx.Client) -> None:
    with (
        served.client(api_key="sk-not-a-real-key-0000") as stranger,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        stranger.chat.completions.create(model=ECHO, messages=HELLO)
    assert_envelope(raised.value, 401, param=None, code="invalid_api_key")
    assert "sk-not-a-real-key" not in raised.value.message
    response = httpx.post(served.base_url + "/chat/completions", json={"model": ECHO, "messages": HELLO})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["x-request-id"]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    page = client.models.list()
    assert [m.id for m in page.data] == [ECHO, BUSY, QUEUED, BROKEN]
    assert {m.object for m in page.data} == {"model"}
    assert all(m.owned_by and m.created > 0 for m in page.data)
    model = client.models.retrieve(ECHO)
    assert (model.id, model.object) == (ECHO, "model")
    assert model._request_id is not None


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-5")
    assert_envelope(raised.value, 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-5", messages=HELLO)
    assert_envelope(raised.value, 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-5", prompt="Hi")
    assert raised.value.code == "model_not_found"


def test_request_ids_are_the_gateways_own(http: httpx.Client) -> None:
    # Usage rows are keyed by the request id, so a caller cannot choose it.
    response = http.get("/models", headers={"x-request-id": "trace-0123456789"})
    assert response.headers["x-request-id"].startswith("req_")
    again = http.get("/models", headers={"x-request-id": "trace-0123456789"})
    assert again.headers["x-request-id"] != response.headers["x-request-id"]


def read_event(lines: Iterator[str]) -> str:
    return next(line for line in lines if line)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/no-such-route", 404, "not_found"), ("DELETE", "/chat/completions", 405, "method_not_allowed")],
)
def test_router_answers_are_openai_shaped_with_a_request_id(
    http: httpx.Client, method: str, path: str, status: int, code: str
) -> None:
    # Answered by the router itself, before any middleware: the header must still be there.
    response = http.request(method, path)
    assert response.status_code == status
    assert response.headers["x-request-id"].startswith("req_")
    assert response.json()["error"]["code"] == code


def test_full_queue_answers_503_with_retry_after(served: Served, client: openai.OpenAI) -> None:
    running = {"model": BUSY, "messages": HELLO, "max_tokens": 500, "stream": True}
    with served.http() as http, http.stream("POST", "/chat/completions", json=running) as first:
        lines = first.iter_lines()
        read_event(lines)  # role
        read_event(lines)  # a token: the only slot is taken, and no one may wait
        with pytest.raises(openai.InternalServerError) as raised:
            client.chat.completions.create(model=BUSY, messages=HELLO, max_tokens=2)
    assert_envelope(raised.value, 503, param=None, code="server_overloaded")
    assert raised.value.response.headers["retry-after"] == "1"


def test_queue_admits_up_to_max_queue_then_refuses(served: Served, client: openai.OpenAI) -> None:
    request = {"model": QUEUED, "messages": HELLO, "stream": True}
    with (
        served.http() as http,
        http.stream("POST", "/chat/completions", json=request | {"max_tokens": 500}) as first,
    ):
        first_lines = first.iter_lines()
        read_event(first_lines)
        read_event(first_lines)
        with http.stream("POST", "/chat/completions", json=request | {"max_tokens": 3}) as second:
            second_lines = second.iter_lines()
            read_event(second_lines)  # role; the choice now waits for the slot
            with pytest.raises(openai.InternalServerError) as raised:
                client.chat.completions.create(model=QUEUED, messages=HELLO, max_tokens=2)
            assert raised.value.status_code == 503
            assert raised.value.response.headers["retry-after"] == "1"
            first.close()  # the waiting request gets the slot
            rest = [line for line in second_lines if line]
    assert rest[-1] == "data: [DONE]"
    assert sum('"content":' in line for line in rest) == 3


def test_engine_failure_before_the_response(served: Served, client: openai.OpenAI) -> None:
    seen = {row["id"] for row in served.usage_rows()}
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=BROKEN, messages=HELLO, max_tokens=5)
    assert_envelope(raised.value, 503, param=None, code=None)
    assert raised.value.type == "server_error"
    [row] = [row for row in served.usage_rows() if row["id"] not in seen]
    assert (row["status"], row["completion_tokens"]) == ("failed", 2)


def test_engine_failure_mid_stream_ends_with_an_error_event(
    served: Served, http: httpx.Client, client: openai.OpenAI
) -> None:
    request = {"model": BROKEN, "messages": HELLO, "max_tokens": 5, "stream": True}
    response = http.post("/chat/completions", json=request)
    assert response.status_code == 200  # the status went out with the first byte
    *chunks, last = sse_payloads(response.content)
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Hello", " there"]
    assert last["error"]["type"] == "server_error"
    assert last["error"]["message"]
    row = served.usage_row(response.headers["x-request-id"], wait_s=0)
    assert (row["status"], row["completion_tokens"]) == ("failed", 2)

    with (
        client.chat.completions.create(model=BROKEN, messages=HELLO, max_tokens=5, stream=True) as stream,
        pytest.raises(openai.APIError, match="retry"),
    ):
        for _ in stream:
            pass


async def test_burst_on_a_full_model_never_breaks_a_stream(served: Served) -> None:
    # Requests admitted together may all pass the queue check before any takes the slot; each
    # must then get either a clean 503 or a whole stream, never a 200 cut off mid-body.
    body = {"model": BUSY, "messages": HELLO, "max_tokens": 3, "stream": True}

    async def one(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post("/chat/completions", json=body)

    async with httpx.AsyncClient(base_url=served.base_url, headers=served.headers, timeout=30) as http:
        rounds = [await asyncio.gather(*(one(http) for _ in range(3))) for _ in range(5)]
    for responses in rounds:
        assert 200 in {r.status_code for r in responses}
    for response in (r for responses in rounds for r in responses):
        assert response.status_code in (200, 503)
        if response.status_code == 200:
            assert response.content.endswith(b"data: [DONE]\n\n")
        else:
            assert response.json()["error"]["code"] == "server_overloaded"
