"""Hostile and malformed input on a live gateway: each gets a 4xx in its API's error shape, never a
500, and costs the server a bounded amount of work."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.api.openai.request_bodies import MAX_MESSAGES, MAX_NAME_CHARS
from gateway.errors import MAX_ECHO_CHARS
from gateway.settings import DEFAULT_MAX_TOKENS, RequestDefaults
from tests.support.model_configs import replace_struct, scripted_model
from tests.support.served import Served, serve

MODEL = "m"
ENDLESS = "endless"
UNCAPPED = "uncapped"
SLOW = "slow"
JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
DEEP = "[" * 10_000 + "]" * 10_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    endless = {"end_with_eos": False}
    models = [
        scripted_model(MODEL, max_concurrency=4, context_length=16384),
        scripted_model(ENDLESS, max_concurrency=4, context_length=8192, **endless),
        replace_struct(
            scripted_model(UNCAPPED, max_concurrency=4, context_length=200, **endless),
            defaults=RequestDefaults(max_tokens=None),
        ),
        scripted_model(SLOW, max_concurrency=1, max_queue=8, token_delay_ms=20, end_with_eos=False),
    ]
    with serve(tmp_path_factory, models) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def root(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.live.base_url, headers=served.headers, timeout=60) as client:
        yield client


def openai_error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def problem(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert {"title", "detail", "status"} <= set(body)
    assert body["status"] == status
    return dict(body)


CHAT_BODY = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}]}'
OPENAI_BODIES = {
    CHAT: CHAT_BODY,
    "/v1/completions": b'{"model": "m", "prompt": "%s"}',
    "/admin/keys": b'{"name": "%s"}',
}


@pytest.mark.parametrize("path", sorted(OPENAI_BODIES))
def test_invalid_utf8_is_a_400(root: httpx.Client, path: str) -> None:
    body = OPENAI_BODIES[path].replace(b"%s", b"caf\xe9 \xff\xfe")
    error = openai_error(root.post(path, content=body, headers=JSON))
    assert "UTF-8" in error["message"]


def test_invalid_utf8_prediction_is_a_problem(root: httpx.Client) -> None:
    body = b'{"version": "m", "input": {"prompt": "\xff"}}'
    assert "UTF-8" in problem(root.post("/v1/predictions", content=body, headers=JSON))["detail"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": %s}'),
        (CHAT, '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "metadata": {"a": %s}}'),
        (CHAT, '{"model": "m", "messages": [{"role": "assistant", "content": "x", "tool_calls": %s}]}'),
        ("/v1/completions", '{"model": "m", "prompt": %s}'),
        ("/admin/keys", '{"name": "deep", "metadata": {"a": %s}}'),
    ],
)
def test_deep_nesting_is_a_400(root: httpx.Client, path: str, body: str) -> None:
    openai_error(root.post(path, content=body.replace("%s", DEEP).encode(), headers=JSON))


def test_metadata_nesting_is_bounded_below_the_decoders_limit(root: httpx.Client) -> None:
    nested: Any = "leaf"
    for _ in range(40):
        nested = {"a": nested}
    error = openai_error(root.post("/admin/keys", json={"name": "nested", "metadata": nested}))
    assert error["param"] == "metadata"
    shallow = root.post("/admin/keys", json={"name": "shallow", "metadata": {"a": {"b": [1, {"c": 2}]}}})
    assert shallow.status_code == 201, shallow.text


def test_deep_prediction_input_is_a_problem(root: httpx.Client) -> None:
    body = '{"version": "m", "input": {"prompt": %s}}'.replace("%s", DEEP)
    problem(root.post("/v1/predictions", content=body.encode(), headers=JSON))
    nested: Any = "x"
    for _ in range(40):
        nested = [nested]
    problem(root.post("/v1/predictions", json={"version": "m", "input": {"prompt": "hi", "extra": nested}}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpm", 2**63),
        ("tpm", 2**31),
        ("max_concurrency", 2**63 - 1),
        ("budget_usd", "1e999"),
        ("budget_usd", "-1"),
        ("budget_usd", "NaN"),
        ("expires_at", "9999-12-31T23:59:59-23:59"),
        ("owner", "o" * 201),
        ("allowed_models", ["m"] * 1001),
    ],
)
def test_out_of_range_key_fields_are_400s(root: httpx.Client, field: str, value: Any) -> None:
    error = openai_error(root.post("/admin/keys", json={"name": "big", field: value}))
    assert error["param"] == field
    created = root.post("/admin/keys", json={"name": "small"}).json()
    update = root.patch(f"/admin/keys/{created['id']}", json={field: value})
    assert openai_error(update)["param"] == field


def test_huge_budget_number_is_a_400(root: httpx.Client) -> None:
    body = b'{"name": "rich", "budget_usd": 1e400}'
    assert openai_error(root.post("/admin/keys", content=body, headers=JSON))["param"] == "budget_usd"


@pytest.mark.parametrize("path", ["/v1/usage", "/admin/usage"])
@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "99999999999999999999"])
def test_usage_times_out_of_range_are_400s(root: httpx.Client, path: str, moment: str) -> None:
    assert openai_error(root.get(path, params={"since": moment}))["param"] == "since"


def test_unknown_model_is_not_echoed_whole(root: httpx.Client) -> None:
    name = "x" * 20_000
    long_body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    assert openai_error(root.post(CHAT, json=long_body))["param"] == "model"
    response = root.get("/v1/models/" + "y" * 20_000)
    error = openai_error(response, 404)
    assert len(error["message"]) < MAX_ECHO_CHARS + 100
    assert len(response.content) < 1000
    odd = root.post(CHAT, json={"model": "z" * MAX_NAME_CHARS, "messages": [{"role": "user", "content": "hi"}]})
    assert len(openai_error(odd, 404)["message"]) < MAX_ECHO_CHARS + 100


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_non_json_bodies_are_refused(root: httpx.Client, content_type: str) -> None:
    body = CHAT_BODY.replace(b"%s", b"hi")
    error = openai_error(root.post(CHAT, content=body, headers={"content-type": content_type}))
    assert error["code"] == "invalid_content_type"


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8"])
def test_json_bodies_are_accepted(root: httpx.Client, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    request = root.build_request("POST", CHAT, content=CHAT_BODY.replace(b"%s", b"hi"), headers=headers)
    assert request.headers.get("content-type") == content_type
    assert root.send(request).status_code == 200


def test_message_count_name_and_user_are_capped(root: httpx.Client) -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(MAX_MESSAGES + 1)]
    assert openai_error(root.post(CHAT, json={"model": MODEL, "messages": turns}))["param"] == "messages"
    at_limit = root.post(CHAT, json={"model": MODEL, "messages": turns[: MAX_MESSAGES - 1]})
    assert at_limit.status_code == 200, at_limit.text
    hello = [{"role": "user", "content": "hi", "name": "n" * (MAX_NAME_CHARS + 1)}]
    assert openai_error(root.post(CHAT, json={"model": MODEL, "messages": hello}))["param"] == "messages.[0].name"
    too_long_user = {"model": MODEL, "messages": turns[:1], "user": "u" * (MAX_NAME_CHARS + 1)}
    assert openai_error(root.post(CHAT, json=too_long_user))["param"] == "user"


def test_options_allow_lists_every_method_of_the_path(root: httpx.Client) -> None:
    def allowed(path: str) -> set[str]:
        response = root.options(path)
        assert response.status_code == 204
        return {method.strip() for method in response.headers["allow"].split(",")}

    assert allowed("/admin/keys/some-id") == {"GET", "PATCH", "DELETE", "OPTIONS"}
    assert allowed("/admin/keys") == {"GET", "POST", "OPTIONS"}
    assert allowed("/v1/predictions") == {"GET", "POST", "OPTIONS"}
    assert allowed(CHAT) == {"POST", "OPTIONS"}


def test_metrics_content_type_names_its_charset_once(root: httpx.Client) -> None:
    content_type = root.get("/metrics").headers["content-type"]
    assert content_type.count("charset") == 1, content_type


def test_max_tokens_left_out_is_capped_by_the_models_default(root: httpx.Client) -> None:
    body = {"model": ENDLESS, "messages": [{"role": "user", "content": "go on"}], "max_tokens": None}
    answer = root.post(CHAT, json=body).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    uncapped = root.post(CHAT, json=body | {"model": UNCAPPED}).json()
    usage = uncapped["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 200  # the rest of the context


async def test_a_request_left_while_queued_has_one_cancelled_row(served: Served) -> None:
    """The slow model runs one generation; the second request waits for it and its client leaves."""
    hello = {"model": SLOW, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    async with httpx.AsyncClient(base_url=served.live.base_url, headers=served.headers, timeout=60) as client:
        holder = asyncio.create_task(client.post(CHAT, json=hello))
        await asyncio.sleep(0.2)  # the holder has the slot: every generation step takes 20 ms
        left_ids: list[str] = []
        async with client.stream("POST", CHAT, json=hello | {"stream": True}) as streamed:
            assert streamed.status_code == 200
            left_ids.append(streamed.headers["x-request-id"])
        waiting = asyncio.create_task(client.post(CHAT, json=hello))
        await asyncio.sleep(0.2)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        held = await holder
    assert held.status_code == 200
    print(
        "ROWS",
        [
            (r["model"], r["status"], r["request_id"], r["prompt_tokens"], r["completion_tokens"])
            for r in served.usage_rows("model = ?", SLOW)
        ],
        left_ids,
    )
    row = served.usage_row(left_ids[0])
    assert row["status"] == "cancelled"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)
    assert row["input_cost"] == 0
    assert row["output_cost"] == 0
    # The non-streamed request that was abandoned got no response, but it was admitted: one row too.
    rows = served.usage_rows("model = ? AND status = 'cancelled'", SLOW)
    assert len(rows) == 2
    assert len({r["request_id"] for r in rows}) == 2


async def test_health_answers_while_the_largest_body_is_processed(served: Served) -> None:
    """A chat body near max_body_bytes takes a while to tokenize; /health must not wait for it."""
    content = "lorem ipsum dolor sit amet, " * 36_000  # about 1 MB of text, 250,000 tokens
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}]}).encode()
    assert len(body) < served.live.settings.max_body_bytes
    events: list[str] = []
    async with httpx.AsyncClient(base_url=served.live.base_url, timeout=60) as client:

        async def big() -> None:
            response = await client.post(CHAT, content=body, headers=JSON | served.headers)
            assert openai_error(response)["code"] == "context_length_exceeded"
            events.append("big")

        async def probes() -> None:
            while "big" not in events:
                assert (await client.get("/health")).status_code == 200
                events.append("health")
                await asyncio.sleep(0.005)

        await asyncio.gather(big(), probes())
    assert events.index("big") > 1, "the large request finished before /health could answer twice"
