"""Fair, bounded waiting for a backend's generation slots.

Waiters are served first come, first served. When every slot is busy and ``max_queue``
requests already wait, a new request is refused at once with 503 and ``Retry-After`` instead
of piling up behind the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from gateway.errors import overloaded

RETRY_AFTER_SECONDS = 1


class SlotQueue:
    def __init__(self, slots: int, max_queue: int) -> None:
        self._free = slots
        self._slots = slots
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def ensure_room(self, wanted: int = 1) -> None:
        """Refuse now (503) if ``wanted`` more slots would overflow the queue."""
        if max(0, wanted - self._free) + len(self._waiters) > self._max_queue:
            raise overloaded(RETRY_AFTER_SECONDS)

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if len(self._waiters) >= self._max_queue:
            raise overloaded(RETRY_AFTER_SECONDS)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release()
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()
