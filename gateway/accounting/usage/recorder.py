"""Usage rows reach the database by group commit, and a request learns when its row is durable.

Many requests finish at about the same time; each calls ``record`` and waits. One writer task takes
every entry queued so far, inserts them in one transaction, and only after COMMIT resolves each
waiter. The HTTP layer sends a response's final bytes after ``record`` returns, so a response a
client saw complete always has its row, even if the process is killed the next instant.

A batch that fails is retried; one that keeps failing is split so a single bad entry cannot sink
the others; an entry that still cannot be stored makes its ``record`` raise ``UsageNotRecorded``.
Nothing is dropped without its waiter hearing of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.usage.entry import UsageEntry
from gateway.accounting.usage.rows import insert_entries

logger = logging.getLogger(__name__)

_Pending = tuple[UsageEntry, "asyncio.Future[None]"]


class UsageNotRecorded(Exception):
    """The usage row could not be committed; the response must not be reported as complete."""


class RecorderClosed(UsageNotRecorded):
    """``record`` was called after ``aclose`` began."""


class UsageRecorder:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        flush_interval_s: float = 0.005,
        max_batch: int = 500,
        retry_delays_s: Sequence[float] = (0.05, 0.25, 1.0, 2.0, 4.0),
    ) -> None:
        self._sessionmaker = sessionmaker
        self._flush_interval = flush_interval_s
        self._max_batch = max_batch
        self._retry_delays = tuple(retry_delays_s)
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.committed = 0
        """Rows committed since start."""
        self.batches = 0
        """Transactions committed since start."""
        self.failures = 0
        """Transactions that failed (each was retried or its entries reported)."""
        self.rejected = 0
        """Entries given up on: their ``record`` raised ``UsageNotRecorded``."""

    @property
    def backlog(self) -> int:
        """Entries waiting for their commit."""
        return len(self._queue) + self._in_flight

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="usage-recorder")

    async def record(self, entry: UsageEntry) -> None:
        """Queue the row and return once it is committed (raises ``UsageNotRecorded`` if it cannot be)."""
        if self._task is None:
            raise RuntimeError("UsageRecorder.start() must be called first")
        if self._closing or self._task.done():
            raise RecorderClosed("the usage recorder is shut down")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, future))
        self._wakeup.set()
        # A client that disconnects cancels its request task; the row must be written regardless.
        await asyncio.shield(future)

    async def aclose(self) -> None:
        """Stop taking entries and wait until every queued one is committed or reported."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        try:
            while self._queue or not self._closing:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    # After a quiet spell, wait briefly so that requests finishing together share a commit.
                    if self._flush_interval > 0 and not self._closing:
                        await asyncio.sleep(self._flush_interval)
                    continue
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                self._in_flight = len(batch)
                try:
                    await self._write(batch)
                finally:
                    self._in_flight = 0
        except BaseException as exc:
            # The writer must never leave a waiter hanging, whatever stopped it.
            self._closing = True
            pending, self._queue = self._queue, []
            self._fail(pending, exc)
            raise

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            error = await self._commit_with_retries(batch)
            if error is not None and len(batch) > 1:
                # Split so that an entry the database refuses fails alone.
                for single in batch:
                    if (alone := await self._commit([single])) is not None:
                        self._fail([single], alone)
            elif error is not None:
                self._fail(batch, error)
        except BaseException as exc:
            self._fail(batch, exc)
            raise

    async def _commit_with_retries(self, batch: list[_Pending]) -> BaseException | None:
        error: BaseException | None = None
        for delay in (0.0, *self._retry_delays):
            if delay:
                await asyncio.sleep(delay)
            error = await self._commit(batch)
            if error is None or isinstance(error, IntegrityError | DataError):
                break  # committed, or refused for a reason that a retry would meet again
        return error

    async def _commit(self, batch: list[_Pending]) -> BaseException | None:
        try:
            refused = await insert_entries(self._sessionmaker, [entry for entry, _ in batch])
        except Exception as exc:
            self.failures += 1
            logger.warning("usage batch of %d rows failed: %s", len(batch), exc)
            return exc
        self.batches += 1
        for entry, future in batch:
            if entry.request_id in refused:
                self._fail([(entry, future)], UsageNotRecorded(refused[entry.request_id]))
            else:
                self.committed += 1
                if not future.done():
                    future.set_result(None)
        return None

    def _fail(self, pending: list[_Pending], cause: BaseException) -> None:
        for entry, future in pending:
            if future.done():
                continue  # committed before whatever stopped the writer
            self.rejected += 1
            logger.error("usage row for request %s not recorded: %s", entry.request_id, cause)
            # One exception object per waiter: raising it in many tasks would tangle its traceback.
            error = UsageNotRecorded(f"usage row for request {entry.request_id} not committed: {cause}")
            error.__cause__ = cause
            future.set_exception(error)
