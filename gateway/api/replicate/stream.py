"""A prediction's server-sent events, as Replicate streams them.

``output`` carries one text piece (plain text), ``error`` a JSON object with ``detail``, and ``done``
closes the stream with ``{}``, ``{"reason": "canceled"}`` or ``{"reason": "error"}``. Every event has
an ``id`` (the output piece's index, then the count), which Replicate's Python client requires; a
client that reconnects with ``Last-Event-ID`` resumes after that piece. A client connecting after the
prediction started gets the pieces so far, then follows it to the end. On the replica that runs it
each piece goes out as it is produced; elsewhere the stored prediction is read every
``REMOTE_POLL_S`` (it is at most ``runner.PROGRESS_INTERVAL_S`` behind).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from gateway.api.replicate.predictions import Prediction

KEEPALIVE_SECONDS = 15.0
REMOTE_POLL_S = 0.25
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


Reread = Callable[[], Awaitable[Prediction | None]]
"""Reads a prediction that runs on another replica back from the database."""


async def _followed(prediction: Prediction, reread: Reread | None) -> AsyncIterator[Prediction | None]:
    """The prediction each time it may have changed, ``None`` when nothing changed for a while."""
    current = prediction
    while True:
        yield current
        if current.done:
            return
        if reread is None:  # running here: wake at its next change
            try:
                async with asyncio.timeout(KEEPALIVE_SECONDS):
                    await current.changed()
            except TimeoutError:
                yield None
            continue
        waited = 0.0
        while True:
            await asyncio.sleep(REMOTE_POLL_S)
            waited += REMOTE_POLL_S
            fresh = await reread()
            if fresh is None:  # purged meanwhile
                return
            if fresh.done or len(fresh.output) > len(current.output):
                current = fresh
                break
            if waited >= KEEPALIVE_SECONDS:
                waited = 0.0
                yield None


async def prediction_events(
    prediction: Prediction, start: int = 0, reread: Reread | None = None
) -> AsyncIterator[bytes]:
    """The events of a prediction running here (``reread`` None) or, read back with ``reread``, elsewhere."""
    sent = start
    last = prediction
    async for state in _followed(prediction, reread):
        if state is None:
            yield b": keepalive\n\n"  # a comment line: keeps proxies and client read timeouts at bay
            continue
        last = state
        while sent < len(state.output):
            yield sse_event("output", state.output[sent], sent)
            sent += 1
    final = max(sent, len(last.output))
    if last.status == "failed":
        yield sse_event("error", _json({"detail": last.error or "The prediction failed."}), final)
        yield sse_event("done", _json({"reason": "error"}), final + 1)
    elif last.status == "canceled":
        yield sse_event("done", _json({"reason": "canceled"}), final)
    else:
        yield sse_event("done", "{}", final)
