"""A prediction's server-sent events, as Replicate streams them.

``output`` carries one text piece (plain text), ``error`` a JSON object with ``detail``, and ``done``
closes the stream with ``{}``, ``{"reason": "canceled"}`` or ``{"reason": "error"}``. Every event has
an ``id`` (the output piece's index, then the count), which Replicate's Python client requires; a
client that reconnects with ``Last-Event-ID`` resumes after that piece. A client connecting after the
prediction started gets the pieces so far, then follows it to the end.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from gateway.api.replicate.predictions import Prediction

KEEPALIVE_SECONDS = 15.0
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_encode = msgspec.json.Encoder().encode


def sse_event(event: str, data: str, event_id: int) -> bytes:
    # A multi-line piece becomes several data lines, which clients join back with "\n".
    lines = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    return f"event: {event}\nid: {event_id}\n{lines}\n".encode()


def _json(value: dict[str, Any]) -> str:
    return _encode(value).decode()


def resume_index(last_event_id: str | None) -> int:
    """The first output piece to send to a client that already has ``Last-Event-ID``."""
    if last_event_id is None:
        return 0
    try:
        return max(0, int(last_event_id.strip()) + 1)
    except ValueError:
        return 0


async def prediction_events(prediction: Prediction, start: int = 0) -> AsyncIterator[bytes]:
    sent = start
    while True:
        while sent < len(prediction.output):
            yield sse_event("output", prediction.output[sent], sent)
            sent += 1
        if prediction.done:
            break
        try:
            async with asyncio.timeout(KEEPALIVE_SECONDS):
                await prediction.changed()
        except TimeoutError:
            yield b": keepalive\n\n"  # a comment line: keeps proxies and client read timeouts at bay
    final = max(sent, len(prediction.output))
    if prediction.status == "failed":
        yield sse_event("error", _json({"detail": prediction.error or "The prediction failed."}), final)
        yield sse_event("done", _json({"reason": "error"}), final + 1)
    elif prediction.status == "canceled":
        yield sse_event("done", _json({"reason": "canceled"}), final)
    else:
        yield sse_event("done", "{}", final)
