"""Structured output, tool calls and log-probabilities through a live gateway and the official
OpenAI SDK, on the embedded SmolLM2 (its own chat template), the tiny random Llama 2 (the
``llama-2`` template) and scripted replies where the model's choice is not the subject."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.support.embedded import DirectEngine
from tests.support.model_configs import EMBEDDED, TINY, embedded_model, scripted_model, tiny_llama2_model
from tests.support.served import Served, serve, sse_payloads

CALLS_WEATHER = "calls-weather"
MALFORMED_CALL = "malformed-call"
UNKNOWN_TOOL = "unknown-tool"
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
RERUN_TOLERANCE = 0.01
"""Log-probabilities of two runs of one engine: llama.cpp sums a prompt in batches that depend on
what its cache holds already, so two runs agree to about 1e-3, not to the last digit."""
ASK_WEATHER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    city: str = Field(max_length=20)
    street: str = Field(max_length=20)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    favourite_colour: Colour
    hobbies: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)
    address: Address


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")

    explanation: str = Field(max_length=40)
    output: str = Field(max_length=20)


class Reasoning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[Step] = Field(min_length=1, max_length=2)
    final_answer: str = Field(max_length=20)


class Verdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: Literal["yes", "no"]
    certain: bool


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    models = [
        embedded_model(),
        tiny_llama2_model(tiny_model_dir),
        scripted_model(CALLS_WEATHER, reply="Let me look. " + WEATHER_CALL),
        scripted_model(
            MALFORMED_CALL, reply='<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
        ),
        scripted_model(UNKNOWN_TOOL, reply='<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>'),
    ]
    with serve(tmp_path_factory, models) as gateway:
        yield gateway


# response_format


@pytest.mark.parametrize("schema", [Person, Reasoning, Verdict])
def test_parse_returns_an_object_of_the_schema(client: openai.OpenAI, schema: type[BaseModel]) -> None:
    completion = client.chat.completions.parse(
        model=EMBEDDED,
        messages=[{"role": "user", "content": f"Give me an example {schema.__name__} as JSON."}],
        response_format=schema,
        temperature=0,
        max_tokens=400,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, schema)


def test_sampled_replies_keep_to_the_schema(client: openai.OpenAI) -> None:
    """At temperature 1 the model would wander anywhere; the grammar keeps every reply valid."""
    schema = Person.model_json_schema()
    completion = client.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "Describe someone."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        temperature=1,
        seed=7,
        n=3,
        max_tokens=400,
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_mode_gives_an_object_streamed(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "List three fruits in JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=200,
        stream=True,
    ) as stream:
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still the start of an object
        assert text.startswith("{")


def test_the_tiny_llama2_model_keeps_to_a_regex(http: Any) -> None:
    for seed in range(3):
        response = http.post(
            "/chat/completions",
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": "Yes or no?"}],
                "guided_regex": "(yes|no)( indeed)?",
                "temperature": 1,
                "seed": seed,
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] in {"yes", "no", "yes indeed", "no indeed"}


def test_legacy_completions_take_a_guided_json(http: Any) -> None:
    # Closed and bounded, so that every reply the grammar allows fits in max_tokens: an open object
    # would let a sampled reply add properties until it is cut.
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    for seed in range(3):
        response = http.post(
            "/completions",
            json={
                "model": EMBEDDED,
                "prompt": "A number:",
                "guided_json": schema,
                "max_tokens": 50,
                "temperature": 1,
                "seed": seed,
            },
        )
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["text"]), schema)


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format.json_schema.schema",
            "not",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema", ""),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"guided_regex": "[a-"}, "guided_regex", "regex"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", ""),
        ({"guided_regex": "a", "guided_json": {}}, "guided_regex", "Only one"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "fly"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools.[1].function.name", "twice"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.[0].type", "function"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", ""),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "if": {}}}}]},
            "tools",
            "if",
        ),
    ],
)
def test_requests_that_cannot_be_enforced_get_a_400(http: Any, fields: dict[str, Any], param: str, needle: str) -> None:
    response = http.post("/chat/completions", json={"model": EMBEDDED, "messages": ASK_WEATHER, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param)
    assert needle in error["message"]


SELF_REQUIRING = {
    "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}},
    "$ref": "#/$defs/node",
}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_regex": "[a&&b]"}, "guided_regex"),
        ({"guided_grammar": "start: start"}, "guided_grammar"),
        ({"guided_json": SELF_REQUIRING}, "guided_json"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "loop", "schema": SELF_REQUIRING}}},
            "response_format",
        ),
    ],
)
def test_grammars_no_reply_can_follow_get_a_400_and_one_usage_row(
    served: Served, http: Any, fields: dict[str, Any], param: str
) -> None:
    """They compile, so only the model's first step finds them empty: still the request's fault,
    a 400 the SDKs do not retry (never a 503), with its failed usage row."""
    body = {"model": EMBEDDED, "messages": ASK_WEATHER, "max_tokens": 16, **fields}
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_schema")
    assert error["param"].startswith(param)
    assert "\n" not in error["message"]
    request_id = response.headers["x-request-id"]
    assert [row["status"] for row in served.usage_rows("request_id = ?", request_id)] == ["failed"]

    streamed = http.post("/chat/completions", json={**body, "stream": True})
    assert streamed.status_code == 200
    errors = [p["error"] for p in sse_payloads(streamed.content) if isinstance(p, dict) and "error" in p]
    assert [e["code"] for e in errors] == ["invalid_schema"]
    assert errors[0]["param"].startswith(param)
    assert served.usage_row(streamed.headers["x-request-id"])["status"] == "failed"


def test_backends_without_grammars_refuse_structured_output(http: Any) -> None:
    response = http.post(
        "/chat/completions",
        json={"model": CALLS_WEATHER, "messages": ASK_WEATHER, "response_format": {"type": "json_object"}},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_parameter"


# tools


def _check_calls(calls: Any, allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("model", [EMBEDDED, TINY])
@pytest.mark.parametrize("seed", [1, 2])
def test_required_tool_choice_always_yields_valid_calls(client: openai.OpenAI, model: str, seed: int) -> None:
    completion = client.chat.completions.create(
        model=model,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        temperature=1,
        seed=seed,
        max_tokens=200,
        parallel_tool_calls=False,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


@pytest.mark.parametrize("model", [EMBEDDED, TINY])
def test_a_named_tool_choice_calls_that_function(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        temperature=1,
        seed=3,
        max_tokens=200,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    _check_calls(calls, {"get_time"})


def _streamed_tool_calls(client: openai.OpenAI, **request: Any) -> tuple[dict[int, dict[str, str]], str, str | None]:
    """The calls of one streamed reply, rebuilt from their pieces as the SDK's users do."""
    calls: dict[int, dict[str, str]] = {}
    content = ""
    finish = None
    with client.chat.completions.create(stream=True, **request) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                if piece.id:
                    assert not call["id"], "the id comes once, first"
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["name"] += piece.function.name
                if piece.function and piece.function.arguments:
                    assert call["name"], "the name comes before the arguments"
                    call["arguments"] += piece.function.arguments
            finish = chunk.choices[0].finish_reason or finish
    return calls, content, finish


def test_a_tool_round_trip_streamed_and_not(client: openai.OpenAI) -> None:
    # One call per turn: with parallel calls allowed, a model this small repeats calls until max_tokens.
    request: dict[str, Any] = {
        "model": EMBEDDED,
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 200,
        "parallel_tool_calls": False,
    }
    first = client.chat.completions.create(messages=ASK_WEATHER, tool_choice="required", **request)
    calls = first.choices[0].message.tool_calls
    assert calls
    streamed, _, finish = _streamed_tool_calls(client, messages=ASK_WEATHER, tool_choice="required", **request)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    history = [
        *ASK_WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),
        *[{"role": "tool", "tool_call_id": c.id, "content": '{"temperature": 18, "sky": "clear"}'} for c in calls],
    ]
    final = client.chat.completions.create(messages=history, tool_choice="none", **request)
    assert final.choices[0].finish_reason in {"stop", "length"}
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    _, content, finish = _streamed_tool_calls(client, messages=history, tool_choice="none", **request)
    assert content == final.choices[0].message.content
    assert finish == final.choices[0].finish_reason


def test_auto_replies_are_text_or_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        completion = client.chat.completions.create(
            model=EMBEDDED, messages=ASK_WEATHER, tools=TOOLS, temperature=1, seed=seed, max_tokens=200
        )
        message = completion.choices[0].message
        if message.tool_calls:
            assert completion.choices[0].finish_reason == "tool_calls"
            _check_calls(message.tool_calls, {"get_weather", "get_time"})
        else:
            assert completion.choices[0].finish_reason in {"stop", "length"}


def test_a_written_call_is_parsed_in_auto_mode(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=CALLS_WEATHER, messages=ASK_WEATHER, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    streamed, content, finish = _streamed_tool_calls(client, model=CALLS_WEATHER, messages=ASK_WEATHER, tools=TOOLS)
    assert finish == "tool_calls"
    assert content.strip() == "Let me look."
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]


@pytest.mark.parametrize("model", [MALFORMED_CALL, UNKNOWN_TOOL])
def test_a_call_that_is_not_valid_stays_text(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=ASK_WEATHER, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert "<tool_call>" in (choice.message.content or "")
    streamed, content, finish = _streamed_tool_calls(client, model=model, messages=ASK_WEATHER, tools=TOOLS)
    assert streamed == {}
    assert finish == "stop"
    assert content == choice.message.content


def test_tool_history_reaches_the_llama2_template(client: openai.OpenAI) -> None:
    history: list[Any] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    completion = client.chat.completions.create(model=TINY, messages=history, tools=TOOLS, max_tokens=5)
    with_tools = completion.usage
    plain = client.chat.completions.create(model=TINY, messages=ASK_WEATHER, max_tokens=5).usage
    assert with_tools is not None
    assert plain is not None
    assert with_tools.prompt_tokens > plain.prompt_tokens


# logprobs


def test_chat_logprobs_match_the_engine_run_directly(client: openai.OpenAI, direct_engine: DirectEngine) -> None:
    question = "Name a colour."
    completion = client.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=5,
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(e.token for e in entries).strip() == (choice.message.content or "").strip()
    sampled = direct_engine.greedy(direct_engine.chat_ids(question), 8)
    expected = direct_engine.logprobs(direct_engine.chat_ids(question), sampled, 5)
    for entry, (token_bytes, logprob, top) in zip(entries, expected, strict=True):
        assert bytes(entry.bytes or []) == token_bytes
        assert entry.logprob == pytest.approx(logprob, abs=RERUN_TOLERANCE)
        assert [bytes(t.bytes or []) for t in entry.top_logprobs] == [b for b, _ in top]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=RERUN_TOLERANCE)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy takes the top
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6


def test_streamed_logprobs_equal_the_whole_response(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": EMBEDDED,
        "messages": [{"role": "user", "content": "Count to five."}],
        "temperature": 0,
        "max_tokens": 12,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = client.chat.completions.create(**request)
    with client.chat.completions.create(stream=True, **request) as stream:
        streamed = [
            e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
        ]
    assert whole.choices[0].logprobs is not None
    expected = whole.choices[0].logprobs.content or []
    assert [e.token for e in streamed] == [e.token for e in expected]
    # The second run reuses the first one's cached prompt: llama.cpp's sums then differ in the last digits.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=RERUN_TOLERANCE)


def test_constrained_logprobs_cover_only_allowed_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": Verdict.model_json_schema()}},
        temperature=0,
        max_tokens=40,
        logprobs=True,
        top_logprobs=20,
    )
    entries = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries
    first = entries[0]
    # The reply must open the object: every alternative the model is offered starts with "{".
    assert all(t.token.lstrip().startswith("{") or t.token == "" for t in first.top_logprobs)
    assert sum(math.exp(t.logprob) for t in first.top_logprobs) <= 1 + 1e-6


def test_completion_logprobs_and_echo(http: Any, direct_engine: DirectEngine) -> None:
    prompt = "The capital of France is"
    response = http.post(
        "/completions",
        json={"model": EMBEDDED, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": True},
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    logprobs = choice["logprobs"]
    prompt_ids = direct_engine.text_ids(prompt)
    assert len(logprobs["tokens"]) == len(prompt_ids) + response.json()["usage"]["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    expected = direct_engine.logprobs(prompt_ids[:1], prompt_ids[1:], 3)
    for position, (_, logprob, top) in enumerate(expected, start=1):
        assert logprobs["token_logprobs"][position] == pytest.approx(logprob, abs=RERUN_TOLERANCE)
        assert len(logprobs["top_logprobs"][position]) == len(top)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_echo_alone_repeats_the_prompt(http: Any) -> None:
    for prompt in ("The capital of France is", [1, 415, 5565]):
        response = http.post(
            "/completions", json={"model": TINY, "prompt": prompt, "max_tokens": 3, "echo": True, "temperature": 0}
        )
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["logprobs"] is None
        if isinstance(prompt, str):
            assert choice["text"].startswith(prompt)
        assert len(choice["text"]) > len(prompt if isinstance(prompt, str) else "")


def test_logprobs_stream_on_legacy_completions(http: Any) -> None:
    response = http.post(
        "/completions",
        json={
            "model": EMBEDDED,
            "prompt": "One, two,",
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 1,
            "stream": True,
        },
    )
    events = [e for e in sse_payloads(response.content) if e != "[DONE]"]
    tokens = [t for e in events for t in ((e["choices"][0]["logprobs"] or {}).get("tokens") or [])]
    assert len(tokens) == 6 or events[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(tokens) == "".join(e["choices"][0]["text"] for e in events)
