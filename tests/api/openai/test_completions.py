"""The legacy ``/v1/completions`` endpoint: string and token-id prompts, streamed and not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Completion

from gateway.serving.tokenizers import GGUFTokenizer, SentencePieceTokenizer
from gateway.settings import embedded_model_path
from tests.support.model_configs import EMBEDDED, TINY, embedded_model, tiny_llama2_model
from tests.support.paths import LLAMA2_TOKENIZER_MODEL
from tests.support.served import Served, serve, sse_payloads

PROMPT = "Once upon a time, in a land far away,"
PINNED = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    with serve(tmp_path_factory, [embedded_model(), tiny_llama2_model(tiny_model_dir)]) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    """PROMPT as the tiny Llama 2 sees it: BOS, then the text."""
    tokenizer = SentencePieceTokenizer.from_file(LLAMA2_TOKENIZER_MODEL)
    return [tokenizer.bos_id, *tokenizer.encode(PROMPT)]


@pytest.fixture(scope="module")
def france_ids() -> list[int]:
    """A raw completion prompt for SmolLM2, whose vocabulary adds no BOS."""
    return GGUFTokenizer.from_file(embedded_model_path()).encode("The capital of France is")


def pinned(**request: Any) -> dict[str, Any]:
    return {"model": TINY, "temperature": 0, "max_tokens": PINNED, "extra_body": {"min_tokens": PINNED}} | request


def test_string_prompt(client: openai.OpenAI, prompt_ids: list[int]) -> None:
    completion = client.completions.create(prompt=PROMPT, **pinned())
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == TINY
    assert completion._request_id is not None
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.text
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == PINNED
    assert completion.usage.total_tokens == len(prompt_ids) + PINNED


@pytest.mark.parametrize("shape", ["ids", "nested"])
def test_token_id_prompt_equals_string_prompt(client: openai.OpenAI, prompt_ids: list[int], shape: str) -> None:
    text = client.completions.create(prompt=PROMPT, **pinned())
    prompt: list[int] | list[list[int]] = prompt_ids if shape == "ids" else [prompt_ids]
    ids = client.completions.create(prompt=prompt, **pinned())
    assert ids.choices[0].text == text.choices[0].text
    assert ids.usage == text.usage


def test_streamed_chunks(served: Served, client: openai.OpenAI) -> None:
    whole = client.completions.create(prompt=PROMPT, **pinned())
    request = {
        "model": TINY,
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": PINNED,
        "min_tokens": PINNED,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with served.http() as http, http.stream("POST", "/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        body = response.read()
    *chunks, done = sse_payloads(body)
    assert done == "[DONE]"
    *texts, finish, usage = chunks
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    for chunk in texts:
        [choice] = chunk["choices"]
        assert choice["index"] == 0
        assert choice["finish_reason"] is None
    assert finish["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == []
    assert whole.usage is not None
    assert usage["usage"] == whole.usage.model_dump(exclude_none=True)
    assert "".join(c["choices"][0]["text"] for c in texts) == whole.choices[0].text


def test_sdk_stream_and_usage_row(served: Served, client: openai.OpenAI, prompt_ids: list[int]) -> None:
    with client.completions.create(
        prompt=prompt_ids, stream=True, stream_options={"include_usage": True}, **pinned()
    ) as stream:
        chunks: list[Completion] = list(stream)
        request_id = stream.response.headers["x-request-id"]
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == PINNED
    assert usage.prompt_tokens == len(prompt_ids)
    row = served.usage_row(request_id, wait_s=0)  # committed before the last byte went out
    assert row["endpoint"] == "/v1/completions"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage.prompt_tokens, PINNED)
    assert row["status"] == "length"


def test_max_tokens_defaults_to_16(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=TINY, prompt=PROMPT, temperature=0, extra_body={"min_tokens": 16})
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_stop_sequence(client: openai.OpenAI, france_ids: list[int]) -> None:
    full = client.completions.create(model=EMBEDDED, prompt=france_ids, temperature=0, max_tokens=3)
    text = full.choices[0].text
    assert "Paris" in text
    stopped = client.completions.create(model=EMBEDDED, prompt=france_ids, temperature=0, max_tokens=3, stop="aris")
    assert stopped.choices[0].text == text[: text.index("aris")]
    assert stopped.choices[0].finish_reason == "stop"


def test_n_choices(client: openai.OpenAI) -> None:
    completion = client.completions.create(prompt=PROMPT, n=2, seed=5, **pinned(temperature=1.0))
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text != completion.choices[1].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2 * PINNED


def test_string_prompt_respects_models_bos_setting(client: openai.OpenAI, france_ids: list[int]) -> None:
    by_text = client.completions.create(model=EMBEDDED, prompt="The capital of France is", max_tokens=1)
    assert by_text.usage is not None
    assert by_text.usage.prompt_tokens == len(france_ids)


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 40000]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": PROMPT, "suffix": "The end."}, "suffix"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ],
)
def test_unsupported_or_invalid_prompts(client: openai.OpenAI, request_fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=TINY, max_tokens=1, **request_fields)
    assert raised.value.status_code == 400
    assert raised.value.param == param
    assert raised.value.request_id


def test_missing_prompt(served: Served) -> None:
    with served.http() as http:
        response = http.post("/completions", json={"model": TINY})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert response.json()["error"]["type"] == "invalid_request_error"
