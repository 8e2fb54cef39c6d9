"""Grammars and log-probabilities through the openai backend: a front gateway forwards them to a
worker gateway running the tiny Llama 2 on llama.cpp, which enforces and reports them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from backends.base import GenerationRequest, SamplingParams
from backends.openai_upstream import request_body
from gateway.serving.constraints import regex_constraint
from gateway.settings import ModelConfig, Settings
from tests.support.live import LiveGateway, running_gateway
from tests.support.model_configs import tiny_llama2_model

WORKER_MODEL = "tiny-worker"
FRONT_MODEL = "tiny-front"
CITY_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "find_city",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}},
            "required": ["name"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveGateway]:
    db = tmp_path_factory.mktemp("structured-worker") / "worker.db"
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{db}", models=[tiny_llama2_model(tiny_model_dir, WORKER_MODEL)]
    )
    with running_gateway(settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def front(worker: LiveGateway, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LiveGateway]:
    model = ModelConfig(
        name=FRONT_MODEL,
        backend="openai",
        template="llama-2",
        tokenizer=str(tiny_model_dir / "tokenizer.model"),
        context_length=512,
        options={"base_url": worker.openai_base_url, "model": WORKER_MODEL, "api_key_env": "STRUCTURED_WORKER_KEY"},
    )
    db = tmp_path_factory.mktemp("structured-front") / "front.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STRUCTURED_WORKER_KEY", worker.admin_key)
        with running_gateway(Settings(database_url=f"sqlite+aiosqlite:///{db}", models=[model])) as gateway:
            yield gateway


@pytest.fixture(scope="module")
def client(front: LiveGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=front.openai_base_url, api_key=front.admin_key, max_retries=0)


def test_the_constraint_travels_in_the_field_it_came_from() -> None:
    request = GenerationRequest("r", [1], SamplingParams(max_tokens=4), constraint=regex_constraint("a+"), logprobs=3)
    body = request_body("m", request)
    assert body["guided_regex"] == "a+"
    assert body["logprobs"] == 3


def test_a_regex_is_enforced_by_the_worker(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=FRONT_MODEL,
            messages=[{"role": "user", "content": "Yes or no?"}],
            temperature=1,
            seed=seed,
            extra_body={"guided_regex": "(yes|no)"},
        )
        assert reply.choices[0].message.content in {"yes", "no"}


def test_a_forced_call_comes_back_valid(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=FRONT_MODEL,
        messages=[{"role": "user", "content": "Find Paris."}],
        tools=[CITY_TOOL],
        tool_choice="required",
        temperature=1,
        seed=1,
        max_tokens=200,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls
    for call in calls:
        assert call.function.name == "find_city"
        jsonschema.validate(json.loads(call.function.arguments), CITY_TOOL["function"]["parameters"])


def test_logprobs_come_back_from_the_worker(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=FRONT_MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0,
        max_tokens=5,
        extra_body={"min_tokens": 5},
        logprobs=True,
        top_logprobs=2,
    )
    entries = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries is not None
    assert len(entries) == 5
    for entry in entries:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
