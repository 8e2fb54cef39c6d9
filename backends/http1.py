"""A keep-alive HTTP/1.1 client for workers, on asyncio protocols and the llhttp parser (httptools).

Why not aiohttp: the ``openai`` backend sends every forwarded request through this client, and
there aiohttp's request machinery (URL and header objects, tracing, timers, response objects)
cost 230 us of CPU per request against an instant worker on a 2-core machine, this client 46 us
(``bench/request_steps.py``). It does only what the backend needs: one request at a time per
connection, bodies of known length, responses with a length, chunked or ending with the
connection, idle connections kept per origin for ``keepalive_s``, ``https`` through ``ssl``.

A response is read as it arrives (``readany``); reading stops the socket while more than
``HIGH_WATER_BYTES`` wait unread. A response read to its end with keep-alive returns its
connection to the pool; one given up early closes it, as does any error.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from types import TracebackType

import httptools

HIGH_WATER_BYTES = 256 * 1024
"""Unread body bytes at which the connection stops reading from its socket until they are read."""
MAX_HEAD_BYTES = 64 * 1024
"""A response whose status line and headers are longer than this is refused (aiohttp's limits are
8 KiB a line); without one, a worker could make the parser hold headers without end."""


class Http1Error(Exception):
    """The exchange failed: a connection refused or cut, or a response that is not HTTP."""


class ConnectFailed(Http1Error):
    """No connection could be made (refused, unresolvable, timed out, TLS handshake failed)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A URL split once for every request to it."""

    host: str
    port: int
    tls: bool
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, tls, path)

    @property
    def origin(self) -> tuple[str, int, bool]:
        return self.host, self.port, self.tls

    def head(self, method: str, headers: dict[str, str]) -> bytes:
        """The request line and headers, up to (not including) ``Content-Length``."""
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default_port = 443 if self.tls else 80
        lines = [
            f"{method} {self.path} HTTP/1.1",
            f"Host: {host}" + (f":{self.port}" if self.port != default_port else ""),
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")


class _Connection(asyncio.Protocol):
    """One connection: the parser's callbacks fill the current response's state."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        """A request was sent and its response is not over: only then may bytes arrive."""
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self._head_bytes = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.ends_with_connection = True
        self.error: Http1Error | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.close()  # bytes no request asked for (a server's 408 on an idle connection): not reusable
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Http1Error(f"the worker's response is not valid HTTP: {exc}"))
            self.close()
            return
        if not self.headers_done:
            self._head_bytes += len(data)  # headers still arriving: the parser holds them meanwhile
        if self._head_bytes > MAX_HEAD_BYTES:
            self._fail(Http1Error(f"the worker's response headers are longer than {MAX_HEAD_BYTES} bytes"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self.ends_with_connection and self.error is None:
            self._end()  # a body without a length ends with its connection
        elif not self.complete:
            self._fail(Http1Error("the worker closed the connection" + (f": {exc}" if exc else "")))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # a chunked body's trailer
        self._head_bytes += len(name) + len(value)
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self.ends_with_connection = False

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self.busy = False
        self._end()

    # the response's side
    def _end(self) -> None:
        self.complete = True
        self.headers_done = True
        self._wake()

    def _fail(self, error: Http1Error) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Until something arrives (headers, body, the end or an error)."""
        if self.error is not None:
            raise self.error
        self._waiter = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout_s):
            await self._waiter
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        """Everything buffered, or b"" when nothing is."""
        if not self.chunks:
            return b""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def send(self, data: bytes) -> None:
        self._reset()
        if self.transport is None or self.closed:
            raise Http1Error("the connection is closed")
        self.busy = True
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A worker's answer; leave ``async with`` to give its connection back (or close it)."""

    def __init__(
        self, client: Http1Client, origin: tuple[str, int, bool], connection: _Connection, read_timeout_s: float | None
    ) -> None:
        self._client = client
        self._origin = origin
        self._connection = connection
        self._read_timeout = read_timeout_s
        self.status = connection.status

    async def readany(self) -> bytes:
        """The next bytes of the body as they arrive; b"" once it has ended."""
        connection = self._connection
        while True:
            if data := connection.take():
                return data
            if connection.complete:
                return b""
            await connection.wait(self._read_timeout)

    def read_nowait(self) -> bytes:
        """Whatever of the body has arrived and not been read; b"" if nothing has."""
        return self._connection.take()

    async def read(self, limit: int | None = None) -> bytes:
        """The body to its end, or its first ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        while (limit is None or size < limit) and (piece := await self.readany()):
            parts.append(piece)
            size += len(piece)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        connection = self._connection
        if connection.complete and connection.keep_alive and not connection.closed and not connection.chunks:
            self._client.give_back(self._origin, connection)
        else:
            connection.close()


class Http1Client:
    """Requests over kept-alive connections, per origin."""

    def __init__(self, *, connect_timeout_s: float, keepalive_s: float) -> None:
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self, target: Target, head: bytes, body: bytes = b"", *, read_timeout_s: float | None = None
    ) -> Response:
        """Send ``head`` (from ``Target.head``) and ``body``; return once the response's headers
        have arrived. Raises ``ConnectFailed``, ``Http1Error`` or ``TimeoutError``."""
        connection = await self._connection(target)
        try:
            connection.send(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            while not connection.headers_done:
                await connection.wait(read_timeout_s)
        except BaseException:
            connection.close()
            raise
        return Response(self, target.origin, connection, read_timeout_s)

    async def _connection(self, target: Target) -> _Connection:
        if self._closed:
            raise Http1Error("the client is closed")
        idle = self._idle.get(target.origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if self._reusable(connection, now):
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if target.tls else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(
                    _Connection, target.host, target.port, ssl=tls, server_hostname=target.host if tls else None
                )
        except TimeoutError as exc:
            raise ConnectFailed(
                f"no connection to {target.host}:{target.port} within {self._connect_timeout:g} s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {target.host}:{target.port}: {exc}") from exc
        return protocol

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def give_back(self, origin: tuple[str, int, bool], connection: _Connection) -> None:
        if self._closed:
            connection.close()
            return
        now = time.monotonic()
        connection.idle_since = now
        idle = self._idle.setdefault(origin, [])
        # Taken newest first; the oldest, at the front, are closed here once their time is up.
        while idle and not self._reusable(idle[0], now):
            idle.pop(0).close()
        idle.append(connection)

    def _reusable(self, connection: _Connection, now: float) -> bool:
        """Still open, and idle for less than the keep-alive time."""
        return not connection.closed and now - connection.idle_since < self._keepalive

    def close(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
