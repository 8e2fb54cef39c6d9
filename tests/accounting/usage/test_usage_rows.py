"""``SqliteRowWriter``: rows committed on the event loop's thread leave the write-ahead log's
checkpoints, which take milliseconds, to the writer thread, where the row that declined waits
for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.usage import rows as rows_module
from gateway.accounting.usage.rows import HeldConnectionWriter, SqliteRowWriter
from gateway.db import make_engine, make_sessionmaker, upgrade_database
from gateway.db.tables import UsageRecord
from tests.support.accounting_records import usage_entry

ROWS = 300


async def wal_bytes_after_rows_committed_here(directory: Path) -> tuple[int, int]:
    """The log's size after ``ROWS`` rows offered to ``insert_here`` one after another, as a
    gateway serving one request at a time offers them, and how many rows it declined."""
    url = f"sqlite+aiosqlite:///{directory / 'usage.db'}"
    await upgrade_database(url)
    engine = make_engine(url)
    try:
        key, _ = await KeyStore(make_sessionmaker(engine)).create(NewKey(name="usage"))
        writer = SqliteRowWriter(engine, lock_wait_s=2.0)
        try:
            declined = 0
            for _ in range(ROWS):
                entry = usage_entry(key.id)
                if not writer.insert_here([entry]):
                    declined += 1
                    assert await writer.insert([entry]) == {}
            return (directory / "usage.db-wal").stat().st_size, declined
        finally:
            await writer.aclose()
    finally:
        await engine.dispose()


async def test_rows_committed_here_are_checkpointed_by_the_writer_thread_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rows_module, "CHECKPOINT_EVERY", 10**9)
    (tmp_path / "never").mkdir()
    never, declined = await wal_bytes_after_rows_committed_here(tmp_path / "never")
    # Without the writer's checkpoints the log only grows: the loop's connection never checkpoints,
    # even past the 1,000 pages after which SQLite would have on its own.
    assert never > 1000 * 4096
    assert declined == 0

    monkeypatch.setattr(rows_module, "CHECKPOINT_EVERY", 20)
    (tmp_path / "often").mkdir()
    often, declined = await wal_bytes_after_rows_committed_here(tmp_path / "often")
    assert declined == ROWS // 21  # each 21st row, after 20 committed here
    # The log started again from its beginning after each checkpoint instead of growing.
    assert often < never / 5, (often, never)


async def test_a_database_file_that_cannot_be_opened_declines_the_row_instead_of_raising(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'no-such-directory' / 'usage.db'}")
    writer = SqliteRowWriter(engine, lock_wait_s=0.1)
    try:
        assert writer.insert_here([usage_entry("key")]) is False
    finally:
        await writer.aclose()
        await engine.dispose()


async def test_the_generic_writer_inserts_once_and_refuses_a_request_id_used_twice(db_sessionmaker: Any) -> None:
    """``HeldConnectionWriter``, the writer of databases without a writer of their own."""
    key, _ = await KeyStore(db_sessionmaker).create(NewKey(name="usage"))
    writer = HeldConnectionWriter(db_sessionmaker.kw["bind"])
    try:
        entries = [usage_entry(key.id) for _ in range(3)]
        assert await writer.insert(entries) == {}
        assert await writer.insert(entries) == {}  # a retry meets its own rows
        clash = usage_entry(key.id, request_id=entries[0].request_id, prompt_tokens=999)
        assert list(await writer.insert([clash])) == [clash.request_id]
        assert writer.insert_here(entries) is False
    finally:
        await writer.aclose()
    async with db_sessionmaker() as session:
        assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 3
