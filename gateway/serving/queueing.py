"""Fair, bounded waiting for a backend's generation slots.

Waiters are served first come, first served. A request reserves its slots when it is admitted,
while it can still be answered with a status: when the running, waiting and already reserved
requests leave no room within ``slots + max_queue``, it is refused at once with 503 and
``Retry-After`` instead of piling up. The check and the reservation happen together, with no
await between them, so a burst cannot overshoot the limit; a reserved request always gets its
turn later (a streamed response has sent its 200 by the time it asks for its slot).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from gateway.errors import invalid_request, overloaded

RETRY_AFTER_SECONDS = 1


class Reservation:
    """Slots promised to one admitted request; whatever it does not use goes back."""

    def __init__(self, queue: SlotQueue, count: int) -> None:
        self._queue = queue
        self._left = count

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._left <= 0:
            raise RuntimeError("every reserved slot of this request is in use already")
        self._left -= 1
        self._queue.reserved -= 1
        async with self._queue.slot():
            yield

    def release(self) -> None:
        """Give back the slots never asked for (idempotent)."""
        self._queue.reserved -= self._left
        self._left = 0

    def __del__(self) -> None:
        # A response dropped before its body started (the client left early) never reaches the
        # code that would release it; the slots must not stay promised forever.
        self.release()


class SlotQueue:
    def __init__(self, slots: int, max_queue: int) -> None:
        self._free = slots
        self._slots = slots
        self._max_queue = max_queue
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.reserved = 0

    @property
    def running(self) -> int:
        return self._slots - self._free

    @property
    def waiting(self) -> int:
        """Requests admitted and not yet running: queued for a slot, or about to ask for one."""
        return len(self._waiters) + self.reserved

    def reserve(self, wanted: int = 1) -> Reservation:
        """Promise ``wanted`` slots to a request, or refuse it now."""
        if wanted > self._slots + self._max_queue:
            raise invalid_request(
                f"This model runs at most {self._slots + self._max_queue} generations for one request; "
                f"{wanted} were asked for.",
                param="n",
            )
        if self.running + self.waiting + wanted > self._slots + self._max_queue:
            raise overloaded(RETRY_AFTER_SECONDS)
        self.reserved += wanted
        return Reservation(self, wanted)

    async def _acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
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
        """A slot without a reservation: waits however long the queue is."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()
