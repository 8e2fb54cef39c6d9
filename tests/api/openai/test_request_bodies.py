from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.api.json_bodies import decode_body
from gateway.api.openai.request_bodies import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    logit_bias_ids,
    stop_sequences,
)
from gateway.errors import ApiError

HELLO = [{"role": "user", "content": "Hello"}]


def chat(**fields: Any) -> bytes:
    return msgspec.json.encode({"model": "m", "messages": HELLO} | fields)


def decode_error(body: bytes, schema: type[Any] = ChatCompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as raised:
        decode_body(body, schema)
    assert raised.value.status == 400
    assert raised.value.type == "invalid_request_error"
    return raised.value


def test_valid_chat_request() -> None:
    request = decode_body(
        chat(
            temperature=0.5,
            top_p=1,
            n=2,
            stop=["\n"],
            seed=-1,
            max_completion_tokens=10,
            logit_bias={"42": -100},
            stream=True,
            stream_options={"include_usage": True},
            top_k=-1,
            min_p=0.1,
            repetition_penalty=1.1,
            min_tokens=2,
        ),
        ChatCompletionRequest,
    )
    assert request.temperature == 0.5
    assert request.n == 2
    assert request.stream_options is not None
    assert request.stream_options.include_usage
    assert request.messages[0].content == "Hello"


def test_unknown_fields_are_ignored_and_null_means_absent() -> None:
    request = decode_body(chat(foo=1, metadata={"a": "b"}, store=True, temperature=None, n=None), ChatCompletionRequest)
    assert request.temperature is None
    assert request.n is None


def test_integers_are_accepted_for_floats() -> None:
    assert decode_body(chat(temperature=1), ChatCompletionRequest).temperature == 1.0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": MAX_CHOICES + 1}, "n"),
        ({"n": 1.5}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"stop": 3}, "stop"),
        ({"stop": [1]}, "stop.[0]"),
        ({"logit_bias": {"1": 100.5}}, "logit_bias"),
        ({"logit_bias": ["1"]}, "logit_bias"),
        ({"stream": "true"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"user": 5}, "user"),
        ({"model": 5}, "model"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"messages": [HELLO[0], {"role": 1, "content": "x"}]}, "messages.[1].role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages.[0].content.[0].text"),
        ({"messages": [{"role": "user", "content": [{"text": "a"}]}]}, "messages.[0].content.[0].type"),
        ({"messages": [{"content": "Hello"}]}, "messages.[0].role"),
        ({"response_format": {"type": 1}}, "response_format.type"),
    ],
)
def test_invalid_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    error = decode_error(chat(**fields))
    assert error.param == param
    assert error.message


def test_missing_required_fields() -> None:
    error = decode_error(b'{"messages": []}')
    assert (error.param, error.message) == ("model", "Missing required parameter: 'model'.")
    error = decode_error(chat(messages=[{"content": "Hello"}]))
    assert error.message == "Missing required parameter: 'messages.[0].role'."


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b'{"model": "m",}', b"nul", b"\xff"])
def test_unparsable_bodies(body: bytes) -> None:
    error = decode_error(body)
    assert error.param is None


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"42", b"null"])
def test_bodies_that_are_not_objects(body: bytes) -> None:
    error = decode_error(body)
    assert error.param is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", "text"),
        (["text"], ["text"]),
        ([1, 2, 3], [1, 2, 3]),
        ([[1, 2]], [[1, 2]]),
    ],
)
def test_completion_prompt_shapes(prompt: Any, expected: Any) -> None:
    request = decode_body(msgspec.json.encode({"model": "m", "prompt": prompt}), CompletionRequest)
    assert request.prompt == expected


def test_completion_prompt_of_wrong_type() -> None:
    error = decode_error(msgspec.json.encode({"model": "m", "prompt": {"text": "x"}}), CompletionRequest)
    assert error.param == "prompt"


def test_stop_sequences() -> None:
    assert stop_sequences(None) == ()
    assert stop_sequences("\n") == ("\n",)
    assert stop_sequences(["a", "", "b"]) == ("a", "b")
    with pytest.raises(ApiError) as raised:
        stop_sequences(["a", "b", "c", "d", "e"])
    assert raised.value.param == "stop"


def test_logit_bias_ids() -> None:
    assert logit_bias_ids(None, 100) == {}
    assert logit_bias_ids({"5": -100, "99": 2.5}, 100) == {5: -100, 99: 2.5}
    bad_biases: list[dict[str, float]] = [{"x": 1}, {"100": 1}, {"-1": 1}]
    for bad in bad_biases:
        with pytest.raises(ApiError) as raised:
            logit_bias_ids(bad, 100)
        assert raised.value.param == "logit_bias"
    assert logit_bias_ids({"123456": 1}, None) == {123456: 1}
