"""A client that goes away stops its generation at once and frees the slot for the next request;
its usage row says ``cancelled`` and counts the tokens generated until then."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from backends.scripted import ScriptedBackend
from tests.support.model_configs import EMBEDDED, embedded_model, scripted_model
from tests.support.served import Served, serve

SLOW = "slow"
TOKEN_DELAY_MS = 50
LONG = 400  # tokens: 20 s of the slow model, far longer than any wait below
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def slow_backend() -> ScriptedBackend:
    return ScriptedBackend(token_delay_ms=TOKEN_DELAY_MS, end_with_eos=False, max_concurrency=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, slow_backend: ScriptedBackend) -> Iterator[Served]:
    models = [scripted_model(SLOW, max_concurrency=1, max_queue=1), embedded_model()]
    with serve(tmp_path_factory, models, backends={SLOW: slow_backend}) as gateway:
        yield gateway


def content_events(response: httpx.Response) -> Iterator[str]:
    return (line for line in response.iter_lines() if '"content":"' in line and '"role"' not in line)


def open_and_abandon(served: Served, tokens: int, **request: Any) -> str:
    """Stream a long completion, read ``tokens`` content chunks, then hang up; returns its request id."""
    body = {"messages": HELLO, "stream": True} | request
    with served.http() as http, http.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = content_events(response)
        for _ in range(tokens):
            next(events)
        return response.headers["x-request-id"]


def timed(call: Any) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def wait_until(condition: Any, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.005)
    return time.monotonic() - started


def test_stream_disconnect_frees_the_slot_at_once(
    served: Served, client: openai.OpenAI, slow_backend: ScriptedBackend
) -> None:
    request_id = open_and_abandon(served, 2, model=SLOW, max_tokens=LONG)
    # The backend's generator is closed, not left running to the end.
    assert wait_until(lambda: slow_backend.active == 0, timeout=2) < 1
    elapsed = timed(lambda: client.chat.completions.create(model=SLOW, messages=HELLO, max_tokens=2))
    assert elapsed < 2, f"the next request waited {elapsed:.2f} s"

    row = served.usage_row(request_id)
    assert row["status"] == "cancelled"
    assert 2 <= row["completion_tokens"] < LONG
    assert row["prompt_tokens"] > 0


def test_non_streamed_disconnect_frees_the_slot(
    served: Served, client: openai.OpenAI, slow_backend: ScriptedBackend
) -> None:
    seen = {row["id"] for row in served.usage_rows()}
    with served.client(timeout=0.5) as impatient, pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=SLOW, messages=HELLO, max_tokens=LONG)
    assert wait_until(lambda: slow_backend.active == 0, timeout=2) < 1
    elapsed = timed(lambda: client.chat.completions.create(model=SLOW, messages=HELLO, max_tokens=2))
    assert elapsed < 2, f"the next request waited {elapsed:.2f} s"

    # The abandoned request never got a response to read its id from: its row is the new cancelled one.
    def new_cancelled() -> list[dict[str, Any]]:
        return [row for row in served.usage_rows("status = 'cancelled'") if row["id"] not in seen]

    wait_until(new_cancelled, timeout=5)
    [row] = new_cancelled()
    assert row["model"] == SLOW
    assert 0 < row["completion_tokens"] < LONG


def test_waiting_request_that_disconnects_leaves_the_queue(served: Served, slow_backend: ScriptedBackend) -> None:
    request = {"model": SLOW, "messages": HELLO, "stream": True}
    with (
        served.http() as http,
        http.stream("POST", "/chat/completions", json=request | {"max_tokens": LONG}) as running,
    ):
        next(content_events(running))
        with http.stream("POST", "/chat/completions", json=request | {"max_tokens": 2}) as waiting:
            assert waiting.status_code == 200
            next(waiting.iter_lines())  # its role chunk; the choice now waits for the slot
        # The queue holds one: had the abandoned waiter stayed, this one would be refused.
        with http.stream("POST", "/chat/completions", json=request | {"max_tokens": 2}) as next_one:
            assert next_one.status_code == 200
            running.close()
            lines = [line for line in next_one.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert wait_until(lambda: slow_backend.active == 0, timeout=2) < 1


def test_llamacpp_stream_disconnect_stops_generation(served: Served, client: openai.OpenAI) -> None:
    # min_tokens keeps the model from ending on its own: only the disconnect can stop it.
    request_id = open_and_abandon(served, 3, model=EMBEDDED, max_tokens=1500, min_tokens=1500, temperature=0)
    elapsed = timed(lambda: client.chat.completions.create(model=EMBEDDED, messages=HELLO, max_tokens=2))
    assert elapsed < 3, f"the next request waited {elapsed:.2f} s for the abandoned one"

    row = served.usage_row(request_id)
    assert row["status"] == "cancelled"
    assert 3 <= row["completion_tokens"] < 1500
