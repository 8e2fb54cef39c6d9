"""An instant OpenAI-style server, for measuring what sits in front of it.

It answers every POST at once with a canned reply: ``/v1/chat/completions`` as OpenAI does (JSON,
or SSE when the body asks for ``"stream": true``), ``/v1/completions`` likewise (the gateway's
``openai`` backend always streams from it, with a usage chunk), and ``GET /v1/models``. It speaks
HTTP/1.1 keep-alive on a bare asyncio protocol (uvloop when installed), so its own cost is a few
tens of microseconds a request and what is measured is whatever runs in front of it.

``--chunk-interval-ms`` spaces the chunks of a streamed reply, so that inter-chunk gaps seen
through a proxy can be compared with the upstream's own.

    python -m bench.fake_upstream --port 9100 [--chunk-interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

REPLY_PIECES = ("Hello", "!", " How", " can", " I", " help", " you", " today", "?")
"""One piece per token: the canned reply is this many completion tokens."""
PROMPT_TOKENS = 12
MODEL = "fake-upstream"
MAX_HEADER_BYTES = 65_536


def _usage() -> dict[str, int]:
    completion = len(REPLY_PIECES)
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + content_type
        + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


def _chunk(piece: bytes) -> bytes:
    """One piece of a ``Transfer-Encoding: chunked`` body."""
    return f"{len(piece):x}".encode() + b"\r\n" + piece + b"\r\n"


def _stream_events(chat: bool) -> list[bytes]:
    base: dict[str, Any] = {"id": "cmpl-fake", "created": 0, "model": MODEL}
    events = []
    if chat:
        base["object"] = "chat.completion.chunk"
        events.append(_sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}))
        for piece in REPLY_PIECES:
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            events.append(_sse(base | {"choices": [choice]}))
        events.append(_sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    else:
        base["object"] = "text_completion"
        for piece in REPLY_PIECES:
            events.append(_sse(base | {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}))
        events.append(_sse(base | {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}))
    events.append(_sse(base | {"choices": [], "usage": _usage()}))
    events.append(_sse("[DONE]"))
    return events


def _whole_body(chat: bool) -> bytes:
    text = "".join(REPLY_PIECES)
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
        obj = "text_completion"
    body = {"id": "cmpl-fake", "object": obj, "created": 0, "model": MODEL, "choices": [choice], "usage": _usage()}
    return json.dumps(body, separators=(",", ":")).encode()


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
WHOLE = {chat: _response("200 OK", b"application/json", _whole_body(chat)) for chat in (True, False)}
EVENTS = {chat: _stream_events(chat) for chat in (True, False)}
INSTANT_STREAM = {chat: STREAM_HEAD + b"".join(_chunk(e) for e in EVENTS[chat]) + _chunk(b"") for chat in (True, False)}
MODELS = _response(
    "200 OK",
    b"application/json",
    json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "x"}]}).encode(),
)
NOT_FOUND = _response("404 Not Found", b"application/json", b'{"error":{"message":"not found"}}')


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, chunk_interval_s: float) -> None:
        self._buffer = b""
        self._interval = chunk_interval_s
        self._transport: asyncio.Transport | None = None
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._busy:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        transport = self._transport
        while transport is not None and not transport.is_closing():
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    transport.close()
                return
            head = self._buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            if not self._answer(transport, method, path, body):
                return

    def _answer(self, transport: asyncio.Transport, method: str, path: str, body: bytes) -> bool:
        """Write the answer; False when it is written later (a paced stream)."""
        if method == "GET" and path.endswith("/models"):
            transport.write(MODELS)
            return True
        if method != "POST" or not (path.endswith("/chat/completions") or path.endswith("/completions")):
            transport.write(NOT_FOUND)
            return True
        chat = path.endswith("/chat/completions")
        stream = bool(json.loads(body or b"{}").get("stream"))
        if not stream:
            transport.write(WHOLE[chat])
        elif self._interval <= 0:
            transport.write(INSTANT_STREAM[chat])
        else:
            self._busy = True
            asyncio.get_running_loop().create_task(self._paced(transport, chat))
            return False
        return True

    async def _paced(self, transport: asyncio.Transport, chat: bool) -> None:
        transport.write(STREAM_HEAD)
        for event in EVENTS[chat]:
            # A chat stream's role chunk goes at once, as servers send it; each token a beat later.
            if b'"role"' not in event:
                await asyncio.sleep(self._interval)
            if transport.is_closing():
                return
            transport.write(_chunk(event))
        transport.write(_chunk(b""))
        self._busy = False
        self._serve_buffered()


async def serve(host: str, port: int, chunk_interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(chunk_interval_s), host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    started = time.monotonic()
    try:
        runner(serve(args.host, args.port, args.chunk_interval_ms / 1000))
    except KeyboardInterrupt:
        print(f"fake upstream stopped after {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
