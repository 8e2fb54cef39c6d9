"""Time to first byte, to first content and between content chunks of one streamed chat completion.

A bare asyncio client on one keep-alive connection, so the client's own cost is the same whether
it talks to the upstream directly or through the gateway. Times are taken when bytes arrive; each
SSE event carrying non-empty ``delta.content`` counts as one content chunk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

END_OF_CHUNKED_BODY = b"0\r\n\r\n"


@dataclass
class StreamTimings:
    first_byte_ms: list[float] = field(default_factory=list)
    first_content_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

        return {
            "streams": len(self.total_ms),
            "first_byte_p50_ms": pct(self.first_byte_ms, 0.5),
            "first_content_p50_ms": pct(self.first_content_ms, 0.5),
            "first_content_p99_ms": pct(self.first_content_ms, 0.99),
            "gap_p50_ms": pct(self.gaps_ms, 0.5),
            "gap_p99_ms": pct(self.gaps_ms, 0.99),
            "gap_mean_ms": statistics.fmean(self.gaps_ms) if self.gaps_ms else float("nan"),
            "total_p50_ms": pct(self.total_ms, 0.5),
        }


def _content_events(data: bytes) -> int:
    count = 0
    for line in data.split(b"\n"):
        if line.startswith(b"data: {") and b'"content":"' in line:
            delta = json.loads(line[6:])["choices"][0]["delta"]
            count += bool(delta.get("content"))
    return count


async def time_streams(url: str, body: dict[str, Any], *, streams: int, api_key: str | None = None) -> StreamTimings:
    """Run ``streams`` streamed requests one after another and time each."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = json.dumps({**body, "stream": True}).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n" + (f"Authorization: Bearer {api_key}\r\n" if api_key else "") + "\r\n"
    ).encode()
    timings = StreamTimings()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(streams):
            await _one(reader, writer, head + payload, timings)
    finally:
        writer.close()
    return timings


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, timings: StreamTimings
) -> None:
    started = time.perf_counter()
    writer.write(request)
    await writer.drain()
    buffer = b""
    first_byte: float | None = None
    content_times: list[float] = []
    pending = b""
    while True:
        data = await reader.read(65536)
        now = time.perf_counter()
        if not data:
            raise ConnectionError("the server closed the connection mid-stream")
        if first_byte is None:
            first_byte = now
        buffer += data
        pending += data
        # Only whole lines are parsed; a line cut by a read waits for the rest.
        complete, _, pending = pending.rpartition(b"\n")
        content_times.extend([now] * _content_events(complete))
        if b"[DONE]" in buffer and buffer.endswith(END_OF_CHUNKED_BODY):
            break
    if not buffer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream answered {buffer[:200]!r}")
    timings.first_byte_ms.append((first_byte - started) * 1000)
    timings.total_ms.append((time.perf_counter() - started) * 1000)
    if content_times:
        timings.first_content_ms.append((content_times[0] - started) * 1000)
        timings.gaps_ms.extend((b - a) * 1000 for a, b in itertools.pairwise(content_times))
