"""The openai backend: a front gateway forwarding token-id prompts to worker gateways."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import openai
import pytest

from backends.base import BackendUnavailable, GenerationRequest, SamplingParams
from backends.config import BackendConfig
from backends.openai_upstream import UpstreamOptions, request_body
from gateway.settings import ModelConfig, Settings
from tests.support.live import LiveGateway, free_port, running_gateway
from tests.support.paths import LLAMA2_TOKENIZER_MODEL

TOKENIZER = LLAMA2_TOKENIZER_MODEL
REPLY = "Paris is the capital of France ."


def _scripted(name: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        backend="scripted",
        template="llama-2",
        tokenizer=str(TOKENIZER),
        max_concurrency=4,
        options={"reply": REPLY},
    )


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    db = tmp_path_factory.mktemp("worker") / "worker.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{db}", models=[_scripted("llama-2-worker")])
    with running_gateway(settings) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def front(
    worker: LiveGateway, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[LiveGateway]:
    monkeypatch_module.setenv("WORKER_KEY", worker.admin_key)
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: the replica is skipped
    model = ModelConfig(
        name="llama-2-chat",
        backend="openai",
        template="llama-2",
        tokenizer=str(TOKENIZER),
        max_concurrency=4,
        options={"base_urls": [dead, worker.openai_base_url], "model": "llama-2-worker", "api_key_env": "WORKER_KEY"},
    )
    db = tmp_path_factory.mktemp("front") / "front.db"
    with running_gateway(Settings(database_url=f"sqlite+aiosqlite:///{db}", models=[model])) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _usage_rows(gateway: LiveGateway) -> list[tuple[int, int, str]]:
    path = gateway.settings.database_url.split("///", 1)[1]
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT prompt_tokens, completion_tokens, status FROM usage_records ORDER BY started_at"
        ).fetchall()


def test_chat_through_a_worker_counts_what_the_worker_counted(front: LiveGateway, worker: LiveGateway) -> None:
    client = openai.OpenAI(base_url=front.openai_base_url, api_key=front.admin_key, max_retries=0)
    reply = client.chat.completions.create(
        model="llama-2-chat", messages=[{"role": "user", "content": "Capital of France?"}], max_tokens=50
    )
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    front_row = _usage_rows(front)[-1]
    worker_row = _usage_rows(worker)[-1]
    # The worker saw exactly the prompt ids the front built, and both bill the same tokens.
    assert front_row[:2] == worker_row[:2] == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert reply.usage.completion_tokens == len(REPLY.split())


def test_streamed_length_limit_passes_through(front: LiveGateway) -> None:
    client = openai.OpenAI(base_url=front.openai_base_url, api_key=front.admin_key, max_retries=0)
    stream = client.chat.completions.create(
        model="llama-2-chat",
        messages=[{"role": "user", "content": "Capital of France?"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris is the"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_request_body_sets_every_sampler_field() -> None:
    sampling = SamplingParams(max_tokens=7, temperature=0.0, seed=5, min_tokens=2, logit_bias={13: -100.0})
    body = request_body("worker-model", GenerationRequest("r1", [1, 2, 3], sampling))
    assert body["prompt"] == [1, 2, 3]
    assert body["model"] == "worker-model"
    assert (body["top_k"], body["top_p"], body["repetition_penalty"]) == (-1, 1.0, 1.0)
    assert (body["seed"], body["min_tokens"]) == (5, 2)
    assert body["logit_bias"] == {"13": -100.0}
    assert body["stream_options"] == {"include_usage": True}


def test_missing_worker_key_is_a_clear_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    config = BackendConfig(name="m", options={"base_url": "http://127.0.0.1:1/v1", "api_key_env": "NO_SUCH_KEY_VAR"})
    with pytest.raises(BackendUnavailable, match="NO_SUCH_KEY_VAR is not set"):
        UpstreamOptions.from_config(config)
