"""Every malformed field a client can send gets an OpenAI-shaped 4xx, never a 500 or a hang."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.model_configs import scripted_model
from tests.support.served import Served, serve

MODEL = "scripted"
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    1,
    2**70,
    -(2**70),
    1e308,
    -0.5,
    3.5,
    "",
    "x",
    "1",
    "\u0000",
    "😀" * 50,
    [],
    [1, 2],
    ["a"],
    [None],
    {},
    {"a": 1},
    [[1]],
    {"type": "text"},
]
CHAT_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
]
COMPLETION_FIELDS = ["prompt", "max_tokens", "echo", "suffix", "best_of", "logprobs", "n", "stop", "stream"]
MESSAGE_SHAPES: list[Any] = [
    [{"role": "user"}],
    [{"content": "hi"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "tool", "content": "x", "tool_call_id": "1"}],
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "x" * 100_000}],
    ["user"],
    [[]],
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = scripted_model(MODEL, max_concurrency=4, context_length=2048, reply="ok then")
    with serve(tmp_path_factory, [model], max_body_bytes=200_000) as running:
        yield running


def _check(served: Served, path: str, body: Any) -> int:
    with served.http() as http:
        response = http.post(path, json=body, timeout=30)
    assert response.status_code < 500, (body, response.status_code, response.text[:300])
    assert "x-request-id" in response.headers
    if response.status_code != 200:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["message"]
    return response.status_code


def test_every_odd_value_of_every_chat_field(served: Served) -> None:
    statuses = set()
    for field in CHAT_FIELDS:
        for value in ODD_VALUES:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, field: value}
            statuses.add(_check(served, "/chat/completions", body))
    assert statuses <= {200, 400, 404, 413}
    assert {200, 400} <= statuses


def test_every_odd_value_of_every_completion_field(served: Served) -> None:
    for field in COMPLETION_FIELDS:
        for value in ODD_VALUES:
            _check(served, "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, field: value})


def test_odd_message_shapes(served: Served) -> None:
    for messages in MESSAGE_SHAPES:
        status = _check(served, "/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4})
        assert status in {400, 413}, messages


@pytest.mark.parametrize("body", [[], "text", 1, None, [{"model": MODEL}]])
def test_bodies_that_are_not_objects(served: Served, body: Any) -> None:
    assert _check(served, "/chat/completions", body) == 400


def test_raw_bytes_that_are_not_json(served: Served) -> None:
    for raw in (b"", b"{", b"\xff\xfe", b'{"model": "scripted", "messages": [}', b"null"):
        with served.http() as http:
            response = http.post("/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, raw
        assert response.json()["error"]["type"] == "invalid_request_error"
