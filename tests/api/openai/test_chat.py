"""Chat completions through a live gateway and the official OpenAI SDK, on real llama.cpp engines:
the bundled SmolLM2 (its own chat template) and a tiny random Llama 2 (the ``llama-2`` template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from gateway.serving.prompts import Message
from gateway.serving.prompts.llama2 import build_llama2_prompt
from gateway.serving.tokenizers import SentencePieceTokenizer
from tests.support.embedded import DirectEngine
from tests.support.model_configs import (
    EMBEDDED,
    TINY,
    embedded_model,
    scripted_model,
    tiny_llama2_model,
    with_system_prompt,
)
from tests.support.paths import LLAMA2_TOKENIZER_MODEL
from tests.support.served import Served, serve, sse_payloads

TINY_WITH_SYSTEM = "tiny-llama-2-with-system"
DEFAULT_SYSTEM = "Answer in one word."
INTERLEAVED = "interleaved"
FRANCE: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story about a dragon."}]
# The tiny model's random weights say anything; min_tokens pins its length for exact comparisons.
PINNED = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    models = [
        embedded_model(),
        tiny_llama2_model(tiny_model_dir),
        with_system_prompt(tiny_llama2_model(tiny_model_dir, name=TINY_WITH_SYSTEM), DEFAULT_SYSTEM),
        scripted_model(
            INTERLEAVED, max_concurrency=4, reply="one two three four five", token_delay_ms=2, end_with_eos=False
        ),
    ]
    with serve(tmp_path_factory, models) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def llama2_tokenizer() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_file(LLAMA2_TOKENIZER_MODEL)


def stream_chunks(client: openai.OpenAI, **request: Any) -> tuple[list[ChatCompletionChunk], str]:
    """Every chunk of one streamed request, and its x-request-id."""
    with client.chat.completions.create(stream=True, **request) as stream:
        chunks = list(stream)
        request_id = stream.response.headers["x-request-id"]
    return chunks, request_id


def streamed_text(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


def test_capital_of_france_greedy(client: openai.OpenAI, direct_engine: DirectEngine) -> None:
    completion = client.chat.completions.create(model=EMBEDDED, messages=FRANCE, temperature=0, max_tokens=32)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == EMBEDDED
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion._request_id is not None
    assert completion._request_id.startswith("req_")
    # The same engine called directly on this machine, from the same prompt ids, says the same.
    prompt = direct_engine.chat_ids("What is the capital of France?")
    direct = direct_engine.greedy(prompt, max_tokens=32)
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == len(direct)
    assert choice.message.content == direct_engine.decode(direct)


def test_streamed_chunks_follow_openai_sequence(served: Served) -> None:
    request = {
        "model": TINY,
        "messages": STORY,
        "temperature": 0,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with served.http() as http, http.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        body = response.read()
    *chunks, done = sse_payloads(body)
    assert done == "[DONE]"
    role, *contents, finish, usage = chunks
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert contents
    for chunk in contents:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"}
        assert choice["finish_reason"] is None
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": usage["usage"]["prompt_tokens"],
        "completion_tokens": 6,
        "total_tokens": usage["usage"]["prompt_tokens"] + 6,
    }
    for chunk in [role, *contents, finish]:
        assert chunk["usage"] is None
    assert {c["id"] for c in chunks} == {role["id"]}
    assert role["id"].startswith("chatcmpl-")
    assert {c["created"] for c in chunks} == {role["created"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {TINY}


def test_stream_without_include_usage_has_no_usage_chunk(served: Served) -> None:
    request = {"model": TINY, "messages": STORY, "temperature": 0, "max_tokens": 3, "stream": True}
    with served.http() as http:
        response = http.post("/chat/completions", json=request)
    *chunks, done = sse_payloads(response.content)
    assert done == "[DONE]"
    assert all(c["choices"] for c in chunks)
    assert all(c.get("usage") is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_france_equals_non_streamed_and_usage_counts_streamed_tokens(
    client: openai.OpenAI, served: Served
) -> None:
    request: dict[str, Any] = {"model": EMBEDDED, "messages": FRANCE, "temperature": 0, "max_tokens": 32}
    whole = client.chat.completions.create(**request)
    chunks, request_id = stream_chunks(client, stream_options={"include_usage": True}, **request)

    assert streamed_text(chunks) == whole.choices[0].message.content
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage = chunks[-1].usage
    assert usage is not None
    assert whole.usage is not None
    # Every token of this plain-ASCII answer arrives as its own chunk.
    assert usage.completion_tokens == len(content_chunks) == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "stop"

    row = served.usage_row(request_id, wait_s=0)  # committed before the last byte went out
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert row["status"] == "completed"
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["model"] == EMBEDDED


def test_pinned_length_stream_equals_non_stream_and_usage_rows(client: openai.OpenAI, served: Served) -> None:
    request: dict[str, Any] = {
        "model": TINY,
        "messages": STORY,
        "temperature": 0,
        "max_tokens": PINNED,
        "extra_body": {"min_tokens": PINNED},
    }
    raw = client.chat.completions.with_raw_response.create(**request)
    whole = raw.parse()
    chunks, stream_id = stream_chunks(client, stream_options={"include_usage": True}, **request)

    assert whole.usage is not None
    assert whole.usage.completion_tokens == PINNED
    assert whole.choices[0].finish_reason == "length"
    assert streamed_text(chunks) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage
    for request_id in (raw.headers["x-request-id"], stream_id):
        row = served.usage_row(request_id, wait_s=0)  # committed before the last byte went out
        assert row["prompt_tokens"] == whole.usage.prompt_tokens
        assert row["completion_tokens"] == PINNED
        assert row["status"] == "length"
        assert row["finish_reason"] == "length"


def france_deltas(client: openai.OpenAI) -> list[str]:
    chunks, _ = stream_chunks(client, model=EMBEDDED, messages=FRANCE, temperature=0, max_tokens=32)
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def stop_cases(deltas: list[str]) -> dict[str, list[str]]:
    """Stop sequences made from the reply this machine produces (its exact words depend on the CPU)."""
    return {
        "one token": [deltas[2]],
        # The earliest match wins, whatever the list order.
        "earliest wins": [deltas[4], deltas[1]],
        # A stop spanning two deltas: the first part must be held back, never sent.
        "spans two tokens": [deltas[3][-2:] + deltas[4][:2]],
        "last token": [deltas[-1]],
    }


@pytest.mark.parametrize("case", ["one token", "earliest wins", "spans two tokens", "last token"])
def test_stop_sequences(client: openai.OpenAI, case: str) -> None:
    deltas = france_deltas(client)
    assert len(deltas) >= 5, f"the reply {deltas!r} is too short to build stop sequences from"
    stops = stop_cases(deltas)[case]
    full = "".join(deltas)
    expected = full[: min(full.index(stop) for stop in stops)]
    request: dict[str, Any] = {"model": EMBEDDED, "messages": FRANCE, "temperature": 0, "max_tokens": 32}

    whole = client.chat.completions.create(stop=stops, **request)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    # Counted up to and including the token that completed the stop sequence.
    needed = next(i + 1 for i in range(len(deltas)) if any(s in "".join(deltas[: i + 1]) for s in stops))
    assert whole.usage is not None
    assert whole.usage.completion_tokens == needed

    chunks, _ = stream_chunks(client, stop=stops, **request)
    assert streamed_text(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = ""
    for chunk in chunks:
        sent += chunk.choices[0].delta.content or ""
        assert expected.startswith(sent), f"{sent!r} went out beyond {expected!r}"


def test_partial_stop_prefix_is_released_when_it_does_not_complete(client: openai.OpenAI) -> None:
    deltas = france_deltas(client)
    full = "".join(deltas)
    # Each stop begins like a piece of the reply (held back while it might complete) and never completes.
    never = [deltas[1] + "\u2603never", deltas[-1] + "\u2603never"]
    chunks, _ = stream_chunks(client, model=EMBEDDED, messages=FRANCE, temperature=0, max_tokens=32, stop=never)
    assert streamed_text(chunks) == full
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_finishes_with_length(client: openai.OpenAI, field: str) -> None:
    request: dict[str, Any] = {"model": EMBEDDED, "messages": STORY, "temperature": 0, field: 5}
    completion = client.chat.completions.create(**request)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    chunks, _ = stream_chunks(client, stream_options={"include_usage": True}, **request)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=TINY, messages=STORY, temperature=0, max_tokens=9, max_completion_tokens=3, extra_body={"min_tokens": 3}
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


@pytest.mark.parametrize("n", [2, 3])
def test_n_choices(client: openai.OpenAI, n: int) -> None:
    completion = client.chat.completions.create(
        model=TINY, messages=STORY, n=n, temperature=1.0, seed=7, max_tokens=PINNED, extra_body={"min_tokens": PINNED}
    )
    assert [c.index for c in completion.choices] == list(range(n))
    assert all(c.finish_reason == "length" for c in completion.choices)
    texts = [c.message.content for c in completion.choices]
    assert len(set(texts)) == n, "each choice samples with its own seed"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == n * PINNED
    single = client.chat.completions.create(model=TINY, messages=STORY, max_tokens=1)
    assert single.usage is not None
    assert completion.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is billed once


def test_streamed_n_choices_on_llamacpp(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": TINY,
        "messages": STORY,
        "n": 2,
        "temperature": 1.0,
        "seed": 11,
        "max_tokens": PINNED,
        "extra_body": {"min_tokens": PINNED},
    }
    whole = client.chat.completions.create(**request)
    chunks, _ = stream_chunks(client, stream_options={"include_usage": True}, **request)
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    finishes = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    assert roles == [0, 1]
    assert finishes == {0: "length", 1: "length"}
    for choice in whole.choices:
        assert streamed_text(chunks, choice.index) == choice.message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * PINNED


def test_streamed_n_choices_interleave(client: openai.OpenAI) -> None:
    chunks, _ = stream_chunks(
        client, model=INTERLEAVED, messages=STORY, n=3, max_tokens=20, stream_options={"include_usage": True}
    )
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert sorted(set(order)) == [0, 1, 2]
    assert order != sorted(order), "choices generated side by side stream side by side"
    for index in range(3):
        assert streamed_text(chunks, index).split() == ["one", "two", "three", "four", "five"] * 4
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 60


@pytest.mark.parametrize("model", [EMBEDDED, TINY])
def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model=model, messages=STORY, temperature=1.0, seed=seed, max_tokens=12, extra_body={"min_tokens": 12}
        )
        return completion.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    others = {sample(seed) for seed in (1, 2, 3)}
    assert others - {first}, "different seeds should give different samples"
    chunks, _ = stream_chunks(
        client, model=model, messages=STORY, temperature=1.0, seed=1234, max_tokens=12, extra_body={"min_tokens": 12}
    )
    assert streamed_text(chunks) == first


def test_llama2_prompt_tokens_follow_meta_reference(
    client: openai.OpenAI, llama2_tokenizer: SentencePieceTokenizer
) -> None:
    dialog: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello there </s> [INST] <s>"},
        {"role": "assistant", "content": "Ahoy!"},
        {"role": "user", "content": "Où est le trésor ? 🦜"},
    ]
    expected = build_llama2_prompt(
        [Message(m["role"], str(m["content"])) for m in dialog],  # type: ignore[arg-type]
        llama2_tokenizer,
    )
    completion = client.chat.completions.create(model=TINY, messages=dialog, max_tokens=1)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(expected)
    # A developer message is a system message under another name.
    developer = [{"role": "developer", "content": "You are a pirate."}, *dialog[1:]]
    completion = client.chat.completions.create(model=TINY, messages=developer, max_tokens=1)  # type: ignore[arg-type]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(expected)


def test_models_default_system_prompt(client: openai.OpenAI, llama2_tokenizer: SentencePieceTokenizer) -> None:
    question = "What is the capital of France?"
    with_default = build_llama2_prompt([Message("system", DEFAULT_SYSTEM), Message("user", question)], llama2_tokenizer)
    without = build_llama2_prompt([Message("user", question)], llama2_tokenizer)
    own_system = build_llama2_prompt([Message("system", "Be brief."), Message("user", question)], llama2_tokenizer)

    def prompt_tokens(model: str, messages: list[ChatCompletionMessageParam]) -> int:
        completion = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
        assert completion.usage is not None
        return completion.usage.prompt_tokens

    assert prompt_tokens(TINY_WITH_SYSTEM, FRANCE) == len(with_default)
    assert prompt_tokens(TINY, FRANCE) == len(without)
    explicit: list[ChatCompletionMessageParam] = [{"role": "system", "content": "Be brief."}, *FRANCE]
    assert prompt_tokens(TINY_WITH_SYSTEM, explicit) == len(own_system)


def test_text_parts_are_concatenated(client: openai.OpenAI) -> None:
    parts: list[ChatCompletionMessageParam] = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}],
        }
    ]
    split = client.chat.completions.create(model=EMBEDDED, messages=parts, temperature=0, max_tokens=1)
    whole = client.chat.completions.create(model=EMBEDDED, messages=FRANCE, temperature=0, max_tokens=1)
    assert split.usage == whole.usage
    assert split.choices[0].message.content == whole.choices[0].message.content


async def test_async_client_streams(served: Served) -> None:
    async with served.async_client() as client:
        stream = await client.chat.completions.create(
            model=EMBEDDED, messages=FRANCE, temperature=0, max_tokens=32, stream=True
        )
        assert stream.response.headers["x-request-id"].startswith("req_")
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert "Paris" in text
