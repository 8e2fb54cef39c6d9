"""A worker that answers HTTP requests with exact bytes, for the ``openai`` backend's client tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

END_OF_BODY = b"0\r\n\r\n"
Answer = Callable[[int], bytes | list[bytes]]
"""The raw HTTP response to the n-th request (0-based) the worker receives; a list is written a
piece at a time, with a pause before each."""


def event(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def chunked(*events: bytes, end: bool = True) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"".join(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events)
    return head + body + (END_OF_BODY if end else b"")


def text_event(piece: str, finish: str | None = None) -> bytes:
    return event({"choices": [{"index": 0, "text": piece, "finish_reason": finish}]})


USAGE_3 = event({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}})
GOOD = chunked(text_event("Hel"), text_event("lo"), text_event("!", "stop"), USAGE_3, event(b"[DONE]"))


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
