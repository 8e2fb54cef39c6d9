"""``SqliteRowWriter``: rows committed on the event loop's thread leave the write-ahead log's
checkpoints, which take milliseconds, to the writer thread, where the row that declined waits
for one."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.usage import rows as rows_module
from gateway.accounting.usage.rows import SqliteRowWriter
from gateway.db import make_engine, make_sessionmaker, upgrade_database
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
