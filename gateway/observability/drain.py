"""Graceful shutdown: on SIGTERM, finish what runs, refuse what is new, then stop.

Kubernetes sends SIGTERM, then SIGKILL once the grace period is over. uvicorn's own handling
closes the listening socket first, so a request arriving meanwhile would see a refused
connection. Instead, the first SIGTERM

1. marks the gateway draining: ``/ready`` answers 503 at once, so the pod leaves the Service's
   endpoints, and every new request except probes and scrapes gets 503 with ``Retry-After`` and
   ``Connection: close``, an answer clients retry elsewhere;
2. waits until the requests in flight, streams included, have finished, or ``drain_seconds``
   have passed;
3. hands the signal on to the server's own handler (uvicorn's), which closes the sockets, gives
   stragglers ``AFTER_DRAIN_GRACE_SECONDS``, and runs the lifespan shutdown, where the usage
   recorder commits every queued row.

A second SIGTERM skips the wait. The handler is installed by the app's lifespan and only in the
main thread (a gateway served from a test's thread has none); it works the same in each worker
of ``serve --workers N``, whose parent passes SIGTERM on to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ApiError
from gateway.state import GatewayState

PROBE = "probe"
"""Route option for probes and scrapes: answered as usual while draining, left out of the request log."""
RETRY_AFTER_SECONDS = 2
AFTER_DRAIN_GRACE_SECONDS = 5

_logger = structlog.get_logger("gateway.observability.drain")
_Handler = Callable[[int, FrameType | None], Any] | int | None


class Drain:
    """Counts the requests in flight and runs the shutdown sequence above."""

    def __init__(self, state: GatewayState, drain_seconds: float) -> None:
        self._state = state
        self._drain_seconds = drain_seconds
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._signalled = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: _Handler = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._state.draining

    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def drain(self) -> bool:
        """Refuse new work and wait for the running work; True if it all finished in time."""
        self._state.draining = True
        _logger.info("draining", in_flight=self._in_flight, drain_seconds=self._drain_seconds)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self._drain_seconds)
        except TimeoutError:
            _logger.warning("drain deadline passed", in_flight=self._in_flight)
            return False
        _logger.info("drained")
        return True

    @contextlib.asynccontextmanager
    async def handling_sigterm(self) -> AsyncIterator[None]:
        """Drain on SIGTERM while the block runs (the app's lifespan)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous)
            if self._task is not None and not self._task.done():
                self._task.cancel()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._signalled:
            self._hand_on(signum, frame)  # a second SIGTERM: stop now
            return
        self._signalled = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain_then_stop(), name="drain")

    async def _drain_then_stop(self) -> None:
        await self.drain()
        self._hand_on(signal.SIGTERM, None)

    def _hand_on(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        signal.raise_signal(signum)


_REFUSAL = ApiError(
    503,
    "The server is shutting down; retry the request.",
    type="server_unavailable",
    code="shutting_down",
)
_REFUSAL_BODY = msgspec.json.encode(_REFUSAL.body())
_REFUSAL_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_REFUSAL_BODY)).encode()),
    (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
    (b"connection", b"close"),
]


class DrainMiddleware:
    """Counts requests in flight; while draining, answers new ones 503 without running them."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["route_handler"].opt.get(PROBE):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await send({"type": "http.response.start", "status": 503, "headers": _REFUSAL_HEADERS})
            await send({"type": "http.response.body", "body": _REFUSAL_BODY, "more_body": False})
            return
        self.drain.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.leave()
