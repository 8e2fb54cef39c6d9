"""The engine process dying under load: requests under way get OpenAI-shaped errors and are billed
for what was delivered, ``/ready`` says why while the engine starts again, and then it serves.

Real parts throughout: llama.cpp on the bundled model in its own process, the OpenAI SDK, uvicorn.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from backends.engine_process import backend as engine_process
from backends.engine_process.backend import EngineProcessBackend
from backends.factory import create_backend
from gateway.serving.registry import backend_config
from tests.support.embedded import shared_data_dir
from tests.support.gateway_process import metric_samples, sample
from tests.support.model_configs import EMBEDDED, embedded_model
from tests.support.served import Served, serve

LONG: dict[str, Any] = {"max_tokens": 1500, "extra_body": {"min_tokens": 1500}, "temperature": 0}
COUNT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count from one to a thousand."}]
RESTART_PAUSE_S = 2.0  # long enough for /ready to be seen saying why


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> EngineProcessBackend:
    model = embedded_model(max_concurrency=2)
    config = backend_config(model)
    apart = create_backend(
        "llamacpp",
        type(config)(config.name, config.path, config.context_length, 2, {**config.options, "engine_process": True}),
        weights_dir=shared_data_dir(tmp_path_factory) / "weights",
    )
    assert isinstance(apart, EngineProcessBackend)
    return apart


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, engine: EngineProcessBackend) -> Iterator[Served]:
    with serve(tmp_path_factory, [embedded_model(max_concurrency=2)], backends={EMBEDDED: engine}) as gateway:
        yield gateway


def ready(served: Served) -> httpx.Response:
    return httpx.get(served.live.base_url + "/ready", timeout=10)


def engine_metrics(served: Served) -> tuple[float, float]:
    """``llama_gateway_backend_up`` and ``llama_gateway_engine_exits_total`` of the model."""
    samples = metric_samples(httpx.get(served.live.base_url + "/metrics", timeout=10).text)
    up = sample(samples, "llama_gateway_backend_up", model=EMBEDDED)
    return up, sample(samples, "llama_gateway_engine_exits_total", model=EMBEDDED)


def test_requests_under_way_fail_are_billed_and_the_engine_comes_back(
    served: Served, engine: EngineProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_process, "RESTART_PAUSES", (RESTART_PAUSE_S,))
    assert ready(served).status_code == 200
    assert engine_metrics(served) == (1, 0)
    pid = engine.pid
    assert pid is not None
    client = served.client(max_retries=0)

    def plain() -> openai.APIStatusError:
        try:
            client.chat.completions.create(model=EMBEDDED, messages=COUNT, **LONG)
        except openai.APIStatusError as exc:
            return exc
        raise AssertionError("the request outlived its engine")

    with ThreadPoolExecutor(1) as pool:
        plain_error = pool.submit(plain)
        stream = client.chat.completions.with_raw_response.create(model=EMBEDDED, messages=COUNT, stream=True, **LONG)
        stream_id = stream.headers["x-request-id"]
        chunks = iter(stream.parse())
        shown = 0
        while shown < 3:
            chunk = next(chunks)
            shown += sum(1 for choice in chunk.choices if choice.delta.content)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="failed while generating"):
            for _ in chunks:
                pass
        error = plain_error.result(timeout=60)

    assert error.status_code == 503
    assert error.body == {
        "message": "The model failed while generating; please retry.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    for request_id in (stream_id, error.response.headers["x-request-id"]):
        row = served.usage_row(request_id)
        assert row["status"] == "failed"
        assert row["prompt_tokens"] > 0
    assert served.usage_row(stream_id)["completion_tokens"] >= shown

    # While the engine starts again: /ready says why, and a new request is refused, not hung.
    not_ready = ready(served)
    assert not_ready.status_code == 503
    assert any("SIGKILL" in reason for reason in not_ready.json()["reasons"])
    assert engine_metrics(served) == (0, 1)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=EMBEDDED, messages=COUNT, max_tokens=5)
    assert refused.value.status_code == 503

    deadline = time.monotonic() + 120
    while ready(served).status_code != 200:
        assert time.monotonic() < deadline, ready(served).json()
        time.sleep(0.1)
    assert engine.pid not in (None, pid)
    answer = client.chat.completions.with_raw_response.create(
        model=EMBEDDED, messages=COUNT, max_tokens=8, extra_body={"min_tokens": 8}
    )
    completion = answer.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    row = served.usage_row(answer.headers["x-request-id"])
    assert (row["status"], row["completion_tokens"]) == ("length", 8)
    assert completion.usage.completion_tokens == 8
    # Up again once a generation succeeds (the refused one above counted as a failed generation).
    assert engine_metrics(served) == (1, 1)
