"""The openai backend against a worker that answers with exact bytes: reuse, errors, odd streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from backends.base import GenerationFailed, GenerationRequest, SamplingParams, TokenDelta
from backends.config import BackendConfig
from backends.openai_upstream import OpenAIUpstreamBackend

END_OF_BODY = b"0\r\n\r\n"
Answer = Callable[[int], bytes | list[bytes]]
"""The raw HTTP response to the n-th request (0-based) the worker receives; a list is written a
piece at a time, with a pause before each."""


def _event(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def _chunked(*events: bytes, end: bool = True) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"".join(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events)
    return head + body + (END_OF_BODY if end else b"")


def _text(piece: str, finish: str | None = None) -> bytes:
    return _event({"choices": [{"index": 0, "text": piece, "finish_reason": finish}]})


USAGE_3 = _event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}})
GOOD = _chunked(_text("Hel"), _text("lo"), _text("!", "stop"), USAGE_3, _event(b"[DONE]"))


class Worker:
    """Answers each request on a connection with ``answer(n)``; counts connections and requests."""

    def __init__(self, answer: Answer, *, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                response = self.answer(self.requests)
                self.requests += 1
                if isinstance(response, list):
                    for piece in response:
                        await asyncio.sleep(0.05)
                        writer.write(piece)
                        await writer.drain()
                    continue
                if response.endswith(END_OF_BODY):
                    # The end of the body comes a moment later, as from a real worker, so that a
                    # client that stops reading at [DONE] leaves it unread (and loses the connection).
                    writer.write(response[: -len(END_OF_BODY)])
                    await writer.drain()
                    await asyncio.sleep(0.02)
                    response = END_OF_BODY
                writer.write(response)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


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
    usage_5 = _event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}})
    worker = Worker(lambda _: _chunked(_text("a"), _text("b", "length"), usage_5, _event(b"[DONE]")))
    async for backend in _backend(worker):
        deltas = await _run(backend)
    assert sum(d.tokens for d in deltas) == 5
    assert deltas[-1].finish_reason == "length"


async def test_without_a_usage_chunk_each_event_counts_one_token() -> None:
    worker = Worker(lambda _: _chunked(_text("a"), _text("b"), _text("", "stop"), _event(b"[DONE]")))
    async for backend in _backend(worker):
        deltas = await _run(backend)
    assert sum(d.tokens for d in deltas) == 2


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops", id="status-500"),
        pytest.param(_chunked(_text("a"), _event(b"{not json")), id="invalid-json"),
        pytest.param(_chunked(_event(b"[1, 2]")), id="not-an-object"),
        pytest.param(_chunked(_event({"error": {"message": "out of memory"}})), id="error-event"),
        pytest.param(_chunked(_text("a"), end=False)[:-3], id="cut-mid-stream"),
        pytest.param(_chunked(_event({"choices": [], "usage": {"completion_tokens": "many"}})), id="bad-usage"),
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
    events = [_text("Hel"), _text("lo"), _text("!", "stop"), USAGE_3, _event(b"[DONE]")]
    whole = _chunked(*events)
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
