"""The one statement the recorder runs: insert a batch of usage rows, exactly once each.

``insert_rows`` is the statement and its check against a synchronous SQLAlchemy connection.
Writers run it where it costs least, since it sits on every request's path:

- ``SqliteRowWriter``: the same statement, written out, on a connection of its own in one thread,
  so a batch is one hop from the event loop to that thread and back (through aiosqlite every call
  of a transaction is a hop of its own: a single-row commit took 1.7 ms there, 0.5 ms in a thread
  through SQLAlchemy, and SQLAlchemy's own work was two thirds of what remained). A lone row may
  also be committed on the caller's thread (``insert_here``), when the caller knows that nothing
  else waits for the event loop meanwhile;
- ``AsyncpgRowWriter`` (PostgreSQL): the same statement, written out, through asyncpg itself on
  one connection held open in autocommit mode, so a batch is one round trip (a connection from
  the pool first pings the server and is rolled back when returned: two more);
- ``HeldConnectionWriter`` (any other database SQLAlchemy drives): ``insert_rows`` on one
  connection held open in the same way.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import Connection, Dialect, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounting.usage.entry import UsageEntry
from gateway.db.engine import configure_sqlite
from gateway.db.tables import UsageRecord

logger = logging.getLogger(__name__)

_table = cast(Table, UsageRecord.__table__)
# Columns that tell "this row is ours, from an earlier try" from "another request took this id".
_IDENTITY = ("key_id", "model", "prompt_tokens", "completion_tokens", "started_at")


def insert_rows(connection: Connection, entries: Sequence[UsageEntry]) -> dict[str, str]:
    """Insert the rows in one statement on an autocommit connection; return the request ids
    refused, with the reason.

    One INSERT is atomic on its own: in autocommit mode it is committed when it returns, with one
    round trip instead of BEGIN, INSERT, COMMIT. A COMMIT whose reply was lost may have succeeded,
    and the retry then meets its own rows: ``ON CONFLICT DO NOTHING`` keeps that retry from failing
    the batch, and comparing the rows that were already there tells a retry apart from a request id
    used twice.
    """
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = insert(_table).on_conflict_do_nothing(index_elements=["request_id"]).returning(_table.c.request_id)
    inserted = set(connection.execute(statement, [entry.row() for entry in entries]).scalars().all())
    already = {entry.request_id: entry for entry in entries if entry.request_id not in inserted}
    if not already:
        return {}
    columns = [_table.c.request_id, *(_table.c[name] for name in _IDENTITY)]
    stored = connection.execute(select(*columns).where(_table.c.request_id.in_(already)))
    refused: dict[str, str] = {}
    for request_id, *values in stored.all():
        entry = already[request_id]
        if tuple(values) != tuple(getattr(entry, name) for name in _IDENTITY):
            refused[request_id] = f"request id {request_id!r} already has a different usage row"
    return refused


async def insert_entries(
    sessionmaker: async_sessionmaker[AsyncSession], entries: Sequence[UsageEntry]
) -> dict[str, str]:
    """``insert_rows`` on a connection from the pool (for tools and tests; the recorder uses a writer)."""
    engine: AsyncEngine = sessionmaker.kw["bind"]
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        return await autocommit.run_sync(insert_rows, entries)


class RowWriter(Protocol):
    async def insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]: ...

    def insert_here(self, entries: Sequence[UsageEntry]) -> bool:
        """Commit the rows on the calling thread if that can be done at once; False leaves them
        to ``insert`` (also when a row is refused: ``insert`` reports it)."""
        ...

    async def aclose(self) -> None: ...


class _RowShape:
    """The usage table as a writer that bypasses SQLAlchemy binds it on one dialect: the columns,
    each value converted as SQLAlchemy would (the type's own conversion, then the driver's), and
    the statements written out once per batch size, with the driver's placeholders."""

    def __init__(self, dialect: Dialect, placeholder: Callable[[int], str]) -> None:
        self.columns = [
            (column.name, column.type.dialect_impl(dialect).bind_processor(dialect))
            for column in _table.c
            if column.name != "id"
        ]
        self._identity = [index for index, (name, _) in enumerate(self.columns) if name in _IDENTITY]
        self._placeholder = placeholder
        self._inserts: dict[int, str] = {}

    def values(self, entries: Sequence[UsageEntry]) -> list[list[object]]:
        try:
            return [self._row(entry) for entry in entries]
        except ValueError as exc:  # a value its column cannot hold exactly (money with 11 decimals)
            raise DataError("converting usage values", None, exc) from exc

    def _row(self, entry: UsageEntry) -> list[object]:
        row = entry.row()
        return [row[name] if process is None else process(row[name]) for name, process in self.columns]

    def insert(self, rows: int) -> str:
        """``INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING request_id`` for ``rows`` rows."""
        statement = self._inserts.get(rows)
        if statement is None:
            names = ", ".join(f'"{name}"' for name, _ in self.columns)
            width = len(self.columns)
            values = ", ".join(
                "(" + ", ".join(self._placeholder(row * width + column) for column in range(width)) + ")"
                for row in range(rows)
            )
            statement = (
                f"INSERT INTO {_table.name} ({names}) VALUES {values} "
                "ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
            )
            self._inserts[rows] = statement
        return statement

    def already(
        self, entries: Sequence[UsageEntry], values: list[list[object]], inserted: set[str]
    ) -> dict[str, list[object]]:
        """The identity values of the rows that were not inserted, by request id."""
        return {
            entry.request_id: [row[i] for i in self._identity]
            for entry, row in zip(entries, values, strict=True)
            if entry.request_id not in inserted
        }

    def select_stored(self, count: int) -> str:
        """The stored identity of ``count`` request ids."""
        names = ", ".join(f'"{self.columns[i][0]}"' for i in self._identity)
        ids = ", ".join(self._placeholder(index) for index in range(count))
        return f"SELECT request_id, {names} FROM {_table.name} WHERE request_id IN ({ids})"


def _refusals(already: dict[str, list[object]], stored: Sequence[Sequence[Any]]) -> dict[str, str]:
    """Rows already there that another request made (a retry meets its own rows, which match)."""
    return {
        request_id: f"request id {request_id!r} already has a different usage row"
        for request_id, *values_stored in stored
        if list(values_stored) != already[request_id]
    }


class SqliteRowWriter:
    """The insert on one SQLite connection of the standard library's driver, owned by one thread.

    The statement is written out once per batch size and the values converted by the columns' own
    SQLAlchemy types (``Money``, ``UtcDateTime``), so the rows are what ``insert_rows`` would store;
    SQLAlchemy's execution machinery, three times the cost of the insert itself, is left out.
    """

    def __init__(self, engine: AsyncEngine, *, lock_wait_s: float) -> None:
        self._path = engine.url.database or ""
        # A writer that waits out another's lock longer than a try may last would hold back every
        # batch after it (a thread cannot be cancelled): it gives up in time instead.
        self._lock_wait_s = lock_wait_s
        self._shape = _RowShape(engine.dialect, lambda _: "?")
        self._connection: sqlite3.Connection | None = None
        """The writer thread's."""
        self._here: sqlite3.Connection | None = None
        """The event loop thread's, for ``insert_here``."""
        self._rows_since_checkpoint = 0
        """Rows committed on ``_here`` since the writer thread last checkpointed for them."""
        # A thread of its own fed by a queue: cheaper per batch than an executor's futures, and
        # a daemon, as a transaction cut short by the process's end is rolled back whole.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="usage-writer", daemon=True)
        self._thread.start()

    async def insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, str]] = loop.create_future()
        self._jobs.put((loop, done, entries))
        return await done

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, str):  # _CHECKPOINT
                self._checkpoint()
                continue
            loop, done, entries = job
            try:
                refused = self._insert(self._connect(), entries)
            except Exception as exc:
                _hand_back(loop, done, None, exc)
            else:
                _hand_back(loop, done, refused, None)
        self._close()

    def _checkpoint(self) -> None:
        try:
            self._connect().execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            logger.debug("usage database checkpoint not done: %s", exc)

    def insert_here(self, entries: Sequence[UsageEntry]) -> bool:
        """The insert and its fsync on the calling thread, on a connection of that thread's own
        that does not wait for another writer's lock (it gives up after 1 ms instead).

        That connection never checkpoints the write-ahead log itself (copying it into the
        database file and syncing that takes milliseconds). Every ``CHECKPOINT_EVERY`` rows, as
        SQLite would after about as many pages, the row is declined instead, and goes to the
        writer thread behind a checkpoint: with nothing else being written meanwhile the
        checkpoint completes, and the log starts again from its beginning.
        """
        if self._rows_since_checkpoint >= CHECKPOINT_EVERY:
            self._rows_since_checkpoint = 0
            self._jobs.put(_CHECKPOINT)
            return False
        try:
            if self._here is None:
                self._here = self._connect_here()
            refused = self._insert(self._here, entries)
        except Exception:
            # Busy, unreadable, or a value refused: the thread's path retries, spools or reports.
            here, self._here = self._here, None
            if here is not None:
                here.close()
            return False
        self._rows_since_checkpoint += len(entries)
        return not refused

    def _connect_here(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
        try:
            configure_sqlite(connection, busy_timeout_s=0)
            connection.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            connection.close()
            raise
        return connection

    def _insert(self, connection: sqlite3.Connection, entries: Sequence[UsageEntry]) -> dict[str, str]:
        shape = self._shape
        values = shape.values(entries)
        try:
            flat = [value for row in values for value in row]
            inserted = {row[0] for row in connection.execute(shape.insert(len(entries)), flat)}
            already = shape.already(entries, values, inserted)
            if not already:
                return {}
            stored = connection.execute(shape.select_stored(len(already)), list(already)).fetchall()
        except sqlite3.IntegrityError as exc:
            raise IntegrityError("inserting usage rows", None, exc) from exc
        except sqlite3.Error:
            # A locked or unreadable file: the next try opens the file afresh.
            if connection is self._connection:
                self._close()
            raise
        return _refusals(already, stored)

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            configure_sqlite(connection, busy_timeout_s=self._lock_wait_s)
            self._connection = connection
        return self._connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    async def aclose(self) -> None:
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        here, self._here = self._here, None
        if here is not None:
            here.close()


_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[dict[str, str]]", Sequence[UsageEntry]] | str
_CHECKPOINT = "checkpoint"
CHECKPOINT_EVERY = 250
"""A usage row adds about four pages to the write-ahead log (the table's and its three indexes'):
250 rows are about the 1,000 pages after which SQLite checkpoints by default."""


def _hand_back(
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Future[dict[str, str]],
    refused: dict[str, str] | None,
    error: Exception | None,
) -> None:
    def settle() -> None:
        if done.done():
            return  # its caller gave up (a timeout); a late commit is harmless, the insert is idempotent
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(refused or {})

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)


class _AsyncDriverWriter(abc.ABC):
    """A writer on an asynchronous driver: nothing to skip on the caller's thread, and one insert
    at a time (the recorder's writer and its spool replayer may insert at the same time)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]:
        async with self._lock:
            return await self._insert(entries)

    def insert_here(self, entries: Sequence[UsageEntry]) -> bool:
        return False

    @abc.abstractmethod
    async def _insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]: ...


async def _autocommit_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection from the engine's pool in autocommit mode: each INSERT commits on its own."""
    connection = await engine.connect()
    try:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
    except BaseException:
        await _discard(connection)
        raise
    return connection


class AsyncpgRowWriter(_AsyncDriverWriter):
    """The insert on one asyncpg connection held open in autocommit mode (PostgreSQL), written out
    as for SQLite and sent through the driver itself: through SQLAlchemy's execution machinery a
    one-row commit cost 0.43 ms of CPU, through the driver 0.16 ms. After any failure the
    connection is replaced."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self._engine = engine
        self._shape = _RowShape(engine.dialect, lambda index: f"${index + 1}")
        self._held: AsyncConnection | None = None
        """SQLAlchemy's hold on the connection (it came from the engine's pool, with its settings)."""
        self._driver: asyncpg.Connection | None = None

    async def _insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]:
        shape = self._shape
        values = shape.values(entries)
        driver = await self._connect()
        try:
            flat = [value for row in values for value in row]
            inserted = {row[0] for row in await driver.fetch(shape.insert(len(entries)), *flat)}
            already = shape.already(entries, values, inserted)
            if not already:
                return {}
            stored = await driver.fetch(shape.select_stored(len(already)), *already)
        except BaseException as exc:
            # Broken, timed out mid-statement or refused: a fresh connection is the safe next try.
            await self._release()
            if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
                raise IntegrityError("inserting usage rows", None, exc) from exc
            if isinstance(exc, asyncpg.DataError):
                raise DataError("inserting usage rows", None, exc) from exc
            raise
        return _refusals(already, [tuple(row) for row in stored])

    async def _connect(self) -> asyncpg.Connection:
        if self._driver is None:
            held = await _autocommit_connection(self._engine)
            try:
                raw = await held.get_raw_connection()
            except BaseException:
                await _discard(held)
                raise
            self._held, self._driver = held, raw.driver_connection
        return self._driver

    async def _release(self) -> None:
        held, self._held, self._driver = self._held, None, None
        if held is not None:
            await _discard(held)

    async def aclose(self) -> None:
        held, self._held, self._driver = self._held, None, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held.close()


class HeldConnectionWriter(_AsyncDriverWriter):
    """``insert_rows`` on one connection kept open; after any failure it is replaced."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__()
        self._engine = engine
        self._connection: AsyncConnection | None = None

    async def _insert(self, entries: Sequence[UsageEntry]) -> dict[str, str]:
        connection = self._connection
        if connection is None:
            connection = await _autocommit_connection(self._engine)
            self._connection = connection
        try:
            return await connection.run_sync(insert_rows, entries)
        except BaseException:
            # Broken, timed out mid-statement or refused: a fresh connection is the safe next try.
            self._connection = None
            await _discard(connection)
            raise

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


async def _discard(connection: AsyncConnection) -> None:
    with contextlib.suppress(Exception):
        await connection.invalidate()
    with contextlib.suppress(Exception):
        await connection.close()


def row_writer(engine: AsyncEngine, *, lock_wait_s: float) -> RowWriter:
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        return SqliteRowWriter(engine, lock_wait_s=lock_wait_s)
    if engine.dialect.driver == "asyncpg":
        return AsyncpgRowWriter(engine)
    return HeldConnectionWriter(engine)
