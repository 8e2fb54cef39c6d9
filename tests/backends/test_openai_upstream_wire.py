"""The openai backend against a worker that answers with exact bytes: reuse, errors, odd streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends.base import GenerationFailed, GenerationRequest, SamplingParams, TokenDelta
from backends.config import BackendConfig
from backends.openai_upstream import OpenAIUpstreamBackend
from tests.support.raw_http_worker import END_OF_BODY, GOOD, USAGE_3, Worker, chunked, event, text_event


async def _backend(worker: Worker) -> AsyncIterator[OpenAIUpstreamBackend]:
    server = await asyncio.start_server(worker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = BackendConfig(name="remote", options={"base_url": f"http://127.0.0.1:{port}/v1", "timeout_s": 5})
    backend = OpenAIUpstreamBackend(config)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()
        server.close()


async def _run(backend: OpenAIUpstreamBackend) -> list[TokenDelta]:
    request = GenerationRequest("req-1", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    return [delta async for delta in backend.generate(request)]


async def test_counts_come_from_the_usage_chunk_and_connections_are_reused() -> None:
    worker = Worker(lambda _: GOOD)
    async for backend in _backend(worker):
        for _ in range(3):
            deltas = await _run(backend)
            assert "".join(d.text for d in deltas) == "Hello!"
            assert sum(d.tokens for d in deltas) == 3
            assert deltas[-1].finish_reason == "stop"
    assert worker.requests == 3
    assert worker.connections == 1, "each request opened a connection: the stream was not read to its end"


async def test_the_usage_count_settles_what_was_counted() -> None:
    usage_5 = event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}})
    worker = Worker(lambda _: chunked(text_event("a"), text_event("b", "length"), usage_5, event(b"[DONE]")))
    async for backend in _backend(worker):
        deltas = await _run(backend)
    assert sum(d.tokens for d in deltas) == 5
    assert deltas[-1].finish_reason == "length"


async def test_without_a_usage_chunk_each_event_counts_one_token() -> None:
    worker = Worker(lambda _: chunked(text_event("a"), text_event("b"), text_event("", "stop"), event(b"[DONE]")))
    async for backend in _backend(worker):
        deltas = await _run(backend)
    assert sum(d.tokens for d in deltas) == 2


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops", id="status-500"),
        pytest.param(chunked(text_event("a"), event(b"{not json")), id="invalid-json"),
        pytest.param(chunked(event(b"[1, 2]")), id="not-an-object"),
        pytest.param(chunked(event({"error": {"message": "out of memory"}})), id="error-event"),
        pytest.param(chunked(text_event("a"), end=False)[:-3], id="cut-mid-stream"),
        pytest.param(chunked(event({"choices": [], "usage": {"completion_tokens": "many"}})), id="bad-usage"),
    ],
)
async def test_a_worker_that_misbehaves_fails_the_generation(response: bytes) -> None:
    worker = Worker(lambda _: response, close_after=True)
    async for backend in _backend(worker):
        with pytest.raises(GenerationFailed):
            await _run(backend)


async def test_an_unreachable_replica_is_skipped_for_the_next() -> None:
    worker = Worker(lambda _: GOOD)
    server = await asyncio.start_server(worker.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = await asyncio.start_server(worker.handle, "127.0.0.1", 0)
    dead_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    urls = [f"http://127.0.0.1:{dead_port}/v1", f"http://127.0.0.1:{port}/v1"]
    backend = OpenAIUpstreamBackend(BackendConfig(name="remote", options={"base_urls": urls}))
    await backend.start()
    try:
        deltas = await _run(backend)
    finally:
        await backend.stop()
        server.close()
    assert "".join(d.text for d in deltas) == "Hello!"


async def test_tokens_sent_apart_arrive_apart() -> None:
    """Deltas join only events that have already arrived: a worker's paced tokens are not held back."""
    events = [text_event("Hel"), text_event("lo"), text_event("!", "stop"), USAGE_3, event(b"[DONE]")]
    whole = chunked(*events)
    head_end = whole.index(b"\r\n\r\n") + 4
    pieces = [whole[:head_end], *(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events), END_OF_BODY]
    worker = Worker(lambda _: pieces)
    arrivals: list[str] = []
    async for backend in _backend(worker):
        request = GenerationRequest("req-1", [1, 2, 3, 4], SamplingParams(max_tokens=8))
        async for delta in backend.generate(request):
            arrivals.append(delta.text)
    assert arrivals[:2] == ["Hel", "lo"], arrivals
    assert "".join(arrivals) == "Hello!"
