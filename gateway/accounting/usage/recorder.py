"""Usage rows reach the database by group commit, and a request learns when its row is durable.

Many requests finish at about the same time; each calls ``record`` and waits. One writer task takes
every entry queued so far, inserts them in one transaction, and only after COMMIT resolves each
waiter. It works as a leader and its followers do in a database's group commit: a lone entry is
committed at once, and entries that arrive while a commit is in flight wait for it to end and then
share the next one, so a busy gateway commits in batches without any request waiting on a timer.
The HTTP layer sends a response's final bytes after ``record`` returns, so a response a client saw
complete always has its row, even if the process is killed the next instant.

A row that would commit alone, while nothing else is being served (``commit_here_while``), is
committed by ``record`` itself on the event loop's thread where the writer allows it (SQLite): the
insert and its fsync block the loop for a fraction of a millisecond that no other request waits
for, and the two thread wake-ups of the hop, which cost more than that on a busy or virtual
machine, are skipped. When most recent commits take longer than ``SLOW_COMMIT_HERE_S`` (a slow
disk), rows go through the writer thread again for ``COMMIT_HERE_PAUSE_S`` (``LoopCommitTimes``).

A batch that fails is retried. One the database refuses (``IntegrityError``, ``DataError``: the
entries' own fault) is split so a single bad entry cannot sink the others, and that entry's
``record`` raises ``UsageNotRecorded``. One that cannot be committed because the database is out
of reach goes to the local spool (``spool.py``) when there is one: written and fsynced there, its
``record`` returns, and a replayer commits it once the database answers again. Until the replayer
finds the database back, new batches go straight to the spool, so responses do not wait out the
retries one batch after another. Without a spool, or when the spool cannot be written, ``record``
raises ``UsageNotRecorded``. Nothing is dropped without its waiter hearing of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounting.usage.entry import UsageEntry
from gateway.accounting.usage.rows import row_writer
from gateway.accounting.usage.spool import UsageSpool

logger = logging.getLogger(__name__)

_Pending = tuple[UsageEntry, "asyncio.Future[None]"]

RETRIES_WITHOUT_SPOOL = (0.05, 0.25, 1.0, 2.0, 4.0)
"""Pauses between tries of a batch when giving up means failing its requests: ~7 s of patience."""
RETRIES_BEFORE_SPOOLING = (0.05, 0.25, 1.0)
"""With a spool, a batch is durable on disk after ~1.3 s: waiting longer only delays responses."""
ATTEMPT_TIMEOUT_S = 10.0
ATTEMPT_TIMEOUT_BEFORE_SPOOLING_S = 2.0
"""A try that takes longer is abandoned (the insert is idempotent, so a late commit does no harm).
A healthy batch commits in milliseconds; with a spool, a database that hangs costs a response at
most ~9 s once, after which rows go straight to the spool until the database answers again."""
SLOW_COMMIT_HERE_S = 0.002
COMMIT_HERE_PAUSE_S = 60.0
"""When most of the lone rows' recent commits on the event loop take longer than this, the disk is
too slow to wait for there: rows go through the writer thread for the pause, then the loop tries again."""
COMMIT_HERE_WINDOW = 16
"""How many of the latest commits the verdict looks at. It goes by their median, not their mean: a
few commits held up by the machine (a burst of work at start-up, the process paused, a profiler
attaching) say nothing of the disk and do not cross the limit, while a disk that stays slow does
within a window's majority (9 commits)."""


class LoopCommitTimes:
    """Whether the event loop's own commits are slow: the median of the latest ones."""

    def __init__(self) -> None:
        self._recent: deque[bool] = deque(maxlen=COMMIT_HERE_WINDOW)

    @property
    def slow(self) -> int:
        """How many of the recent commits took longer than ``SLOW_COMMIT_HERE_S``."""
        return sum(self._recent)

    def too_slow_after(self, took_s: float) -> bool:
        """Count one commit; whether the loop should stop committing (the count starts again)."""
        self._recent.append(took_s > SLOW_COMMIT_HERE_S)
        if 2 * self.slow <= COMMIT_HERE_WINDOW:
            return False
        self._recent.clear()
        return True


class UsageNotRecorded(Exception):
    """The usage row could not be committed; the response must not be reported as complete."""


class RecorderClosed(UsageNotRecorded):
    """``record`` was called after ``aclose`` began."""


class UsageRecorder:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        flush_interval_s: float = 0.0,
        max_batch: int = 500,
        retry_delays_s: Sequence[float] | None = None,
        attempt_timeout_s: float | None = None,
        spool: UsageSpool | None = None,
        replay_interval_s: float = 2.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._flush_interval = flush_interval_s
        self._max_batch = max_batch
        if retry_delays_s is None:
            retry_delays_s = RETRIES_BEFORE_SPOOLING if spool is not None else RETRIES_WITHOUT_SPOOL
        self._retry_delays = tuple(retry_delays_s)
        if attempt_timeout_s is None:
            attempt_timeout_s = ATTEMPT_TIMEOUT_BEFORE_SPOOLING_S if spool is not None else ATTEMPT_TIMEOUT_S
        # A connection that hangs instead of failing must not hold every waiter behind it.
        self._attempt_timeout = attempt_timeout_s
        self._writer = row_writer(sessionmaker.kw["bind"], lock_wait_s=attempt_timeout_s)
        self._spool = spool
        self._replay_interval = replay_interval_s
        self._queue: list[_Pending] = []
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._closing = False
        self._database_lost = False
        self._alone: Callable[[], bool] = _never
        self._commit_here_from = 0.0
        self._commit_here_times = LoopCommitTimes()
        self.committed = 0
        """Rows committed since start."""
        self.batches = 0
        """Transactions committed since start."""
        self.failures = 0
        """Transactions that failed (each was retried or its entries reported)."""
        self.rejected = 0
        """Entries given up on: their ``record`` raised ``UsageNotRecorded``, or, spooled, the
        database refused them when they were replayed."""
        self.spooled = 0
        """Entries written to the local spool because the database was out of reach."""
        self.replayed = 0
        """Spooled entries committed by the replayer (this process's and those left by others)."""
        self.committed_here = 0
        """Rows among ``committed`` that ``record`` committed itself, on the event loop's thread."""

    @property
    def backlog(self) -> int:
        """Entries waiting for their commit."""
        return len(self._queue) + self._in_flight

    @property
    def spool_bytes(self) -> int:
        """Size of the spool on disk: entries of every process still waiting for their replay."""
        return 0 if self._spool is None else self._spool.size_bytes()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._run(), name="usage-recorder")
        if self._spool is not None and self._replayer is None:
            # Its first round runs at once: segments left by a crashed process are replayed at startup.
            self._replayer = loop.create_task(self._replay_periodically(self._spool), name="usage-spool-replayer")

    def commit_here_while(self, alone: Callable[[], bool]) -> None:
        """Let ``record`` commit a lone row itself while ``alone()`` says that nothing else is
        being served (the HTTP layer's count of requests in flight)."""
        self._alone = alone

    async def record(self, entry: UsageEntry) -> None:
        """Queue the row and return once it is committed, or durable in the spool while the database
        is out of reach (raises ``UsageNotRecorded`` if neither can be)."""
        if self._task is None:
            raise RuntimeError("UsageRecorder.start() must be called first")
        if self._closing or self._task.done():
            raise RecorderClosed("the usage recorder is shut down")
        if self._committed_here(entry):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, future))
        self._wakeup.set()
        # A client that disconnects cancels its request task, and so this future: the entry stays
        # queued and is written regardless (the writer skips resolving a cancelled future).
        await future

    def _committed_here(self, entry: UsageEntry) -> bool:
        """Commit a lone row on this thread, when nothing else is waiting for it or for the writer."""
        if self._queue or self._in_flight or self._database_lost or self._flush_interval > 0:
            return False
        started = time.monotonic()
        if started < self._commit_here_from or not self._alone():
            return False
        committed = self._writer.insert_here([entry])
        took = time.monotonic() - started
        if self._commit_here_times.too_slow_after(took):
            self._commit_here_from = started + COMMIT_HERE_PAUSE_S
            logger.warning(
                "most of the last %d usage commits on the event loop took over %.1f ms (the last %.1f ms): "
                "rows go through the writer thread for %.0f s",
                COMMIT_HERE_WINDOW,
                SLOW_COMMIT_HERE_S * 1000,
                took * 1000,
                COMMIT_HERE_PAUSE_S,
            )
        if committed:
            self.batches += 1
            self.committed += 1
            self.committed_here += 1
        return committed

    async def aclose(self) -> None:
        """Stop taking entries and wait until every queued one is committed, spooled or reported.

        What is still in the spool stays there for the next start (of this or another process).
        """
        self._closing = True
        self._wakeup.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            if self._replayer is not None:
                self._replayer.cancel()
                await asyncio.gather(self._replayer, return_exceptions=True)
            if self._spool is not None:
                self._spool.close()
            await self._writer.aclose()

    async def _run(self) -> None:
        try:
            while self._queue or not self._closing:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    # Optionally wait after a quiet spell, trading latency for fewer, larger commits.
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
            if self._database_lost and self._spool is not None:
                # Known to be away: straight to the spool. The replayer finds out when it is back.
                await self._spool_or_fail(batch, ConnectionError("the database is unavailable"))
                return
            error = await self._commit_with_retries(batch)
            if error is None:
                return
            if not _refused_by_database(error):
                await self._spool_or_fail(batch, error)
            elif len(batch) > 1:
                # Split so that an entry the database refuses fails alone.
                for single in batch:
                    if (alone := await self._commit([single])) is None:
                        continue
                    if _refused_by_database(alone):
                        self._fail([single], alone)
                    else:
                        await self._spool_or_fail([single], alone)
            else:
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
            if error is None or _refused_by_database(error):
                break  # committed, or refused for a reason that a retry would meet again
        return error

    async def _commit(self, batch: list[_Pending]) -> BaseException | None:
        try:
            refused = await self._insert([entry for entry, _ in batch])
        except Exception as exc:
            self.failures += 1
            logger.warning("usage batch of %d rows failed: %s", len(batch), _describe(exc))
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

    async def _spool_or_fail(self, batch: list[_Pending], cause: BaseException) -> None:
        if self._spool is None:
            self._fail(batch, cause)
            return
        try:
            await self._spool.append([entry for entry, _ in batch])
        except OSError as exc:
            logger.error("usage spool %s cannot be written: %s", self._spool.directory, exc)
            self._fail(batch, cause)
            return
        if not self._database_lost:
            logger.warning(
                "database unavailable (%s): usage rows go to the spool in %s until it is back",
                _describe(cause),
                self._spool.directory,
            )
            self._database_lost = True
        self.spooled += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)

    async def _replay_periodically(self, spool: UsageSpool) -> None:
        while True:
            if self._database_lost or spool.segments():
                try:
                    await self._replay(spool)
                except Exception as exc:
                    logger.debug("usage spool not replayed yet (database unavailable: %s)", _describe(exc))
            await asyncio.sleep(self._replay_interval)

    async def _replay(self, spool: UsageSpool) -> None:
        # Ask first: sealing this process's segment while the database is down would only start another.
        async with asyncio.timeout(self._attempt_timeout):
            await _ping(self._sessionmaker.kw["bind"])
        if self._database_lost:
            logger.warning("database reachable again: usage rows are committed directly")
            self._database_lost = False
        result = await spool.replay(self._insert_spooled)
        self.replayed += result.rows
        self.rejected += result.refused
        if result.rows or result.refused:
            logger.info("usage spool replayed: %d rows committed, %d refused", result.rows, result.refused)

    async def _insert_spooled(self, entries: list[UsageEntry]) -> int:
        refused = 0
        for start in range(0, len(entries), self._max_batch):
            chunk = entries[start : start + self._max_batch]
            try:
                reasons = await self._insert(chunk)
            except (IntegrityError, DataError):
                # Find the entries the database refuses; an error of any other kind ends the round.
                reasons = {}
                for entry in chunk:
                    try:
                        reasons |= await self._insert([entry])
                    except (IntegrityError, DataError) as exc:
                        reasons[entry.request_id] = str(exc)
            for entry in chunk:
                if (reason := reasons.get(entry.request_id)) is not None:
                    refused += 1
                    # The only record of this usage left: the log line carries the whole entry.
                    logger.error("spooled usage row refused by the database (%s): %r", reason, entry)
        return refused

    async def _insert(self, entries: list[UsageEntry]) -> dict[str, str]:
        async with asyncio.timeout(self._attempt_timeout):
            return await self._writer.insert(entries)

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


def _never() -> bool:
    return False


def _refused_by_database(error: BaseException) -> bool:
    """The database answered and refused the entries themselves: retrying or spooling cannot help."""
    return isinstance(error, IntegrityError | DataError)


async def _ping(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def _describe(error: BaseException) -> str:
    # A timeout's message is empty.
    return str(error) or type(error).__name__
