from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.faults.harness import TcpProxy
from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.usage import UsageEntry, UsageNotRecorded, UsageRecorder
from gateway.accounting.usage import spool as spool_module
from gateway.accounting.usage.rows import insert_entries
from gateway.accounting.usage.spool import UsageSpool, encode_lines, spool_directory
from gateway.db import make_engine, make_sessionmaker
from gateway.db.tables import UsageRecord
from tests.support.accounting_records import usage_entry
from tests.support.databases import PostgresServer
from tests.support.outages import database_behind_proxy
from tests.support.paths import REPO_ROOT

Sessions = async_sessionmaker[AsyncSession]
FAST_RETRIES = (0.01, 0.01)
WAIT_S = 30.0


def make_entry(key_id: str = "key", **changes: object) -> UsageEntry:
    # Microseconds and a fixed zone: what a round trip through the spool must keep.
    return usage_entry(key_id, started=datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC), **changes)


class Collector:
    """An insert for ``UsageSpool.replay`` that keeps what it is given, as a database would."""

    def __init__(self) -> None:
        self.entries: list[UsageEntry] = []

    async def __call__(self, entries: list[UsageEntry]) -> int:
        self.entries.extend(entries)
        return 0


async def wait_until(condition: Callable[[], object], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def count_rows(sessions: Sessions, request_ids: list[str]) -> int:
    query = select(func.count()).select_from(UsageRecord).where(UsageRecord.request_id.in_(request_ids))
    async with sessions() as session:
        return int(await session.scalar(query) or 0)


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool" / "db"


@pytest.fixture
async def key_id(db_sessionmaker: Sessions) -> str:
    info, _ = await KeyStore(db_sessionmaker).create(NewKey(name="spooled usage"))
    return info.id


async def test_entries_come_back_exactly_as_they_were_spooled(spool_dir: Path) -> None:
    odd_zone = timezone(timedelta(hours=5, minutes=30))
    entries = [
        make_entry(input_price_per_million=Decimal("0.650"), output_price_per_million=Decimal("12.3456789012")),
        make_entry(
            status="cancelled",
            finish_reason=None,
            ttft_ms=None,
            user="line one\nline two \u00e9",
            started_at=datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=odd_zone),
            finished_at=datetime(2026, 3, 2, 0, 0, 0, 1, tzinfo=odd_zone),
        ),
    ]
    spool = UsageSpool(spool_dir)
    await spool.append(entries[:1])
    await spool.append(entries[1:])
    collected = Collector()
    result = await spool.replay(collected)
    assert collected.entries == entries
    assert [str(e.input_price_per_million) for e in collected.entries] == ["0.650", "0.65"]
    assert collected.entries[1].started_at.utcoffset() == timedelta(hours=5, minutes=30)
    assert (result.rows, result.refused) == (2, 0)
    assert spool.segments() == []


async def test_a_torn_last_line_is_skipped_and_the_rest_replayed(spool_dir: Path) -> None:
    writer = UsageSpool(spool_dir)
    whole = [make_entry() for _ in range(3)]
    await writer.append(whole)
    writer.close()
    [segment] = writer.segments()
    # A crash in the middle of the next append: part of a line, no newline.
    with segment.open("ab") as file:
        file.write(encode_lines([make_entry()])[:57])
    collected = Collector()
    result = await UsageSpool(spool_dir).replay(collected)
    assert collected.entries == whole
    assert result.rows == 3
    assert writer.segments() == []


async def test_a_failed_append_leaves_nothing_for_the_next_one_to_glue_onto(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = UsageSpool(spool_dir)
    first, lost, last = make_entry(), make_entry(), make_entry()
    await spool.append([first])
    real_fdatasync = os.fdatasync

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(OSError, match="Input/output"):
        await spool.append([lost])
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    await spool.append([last])
    collected = Collector()
    await spool.replay(collected)
    assert collected.entries == [first, last]


async def test_a_full_segment_is_sealed_and_can_be_replayed_while_its_writer_goes_on(
    spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [make_entry() for _ in range(5)]
    monkeypatch.setattr(spool_module, "MAX_SEGMENT_BYTES", 2 * len(encode_lines(entries[:1])))
    writer = UsageSpool(spool_dir)
    for entry in entries:
        await writer.append([entry])
    # Two full segments sealed, the fifth entry in the one its writer still holds.
    collected = Collector()
    result = await UsageSpool(spool_dir).replay(collected)
    assert collected.entries == entries[:4]
    assert result.rows == 4
    writer.close()
    await UsageSpool(spool_dir).replay(collected)
    assert collected.entries == entries


WRITER = textwrap.dedent(
    """
    import asyncio, sys, uuid
    from datetime import UTC, datetime
    from decimal import Decimal
    from pathlib import Path
    from gateway.accounting.usage import UsageEntry
    from gateway.accounting.usage.spool import UsageSpool

    directory, name, batches = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def entry(n):
        now = datetime.now(UTC)
        return UsageEntry(
            request_id=f"{name}-{n}", key_id="key", model="m", endpoint="/v1/chat/completions",
            prompt_tokens=n, completion_tokens=1, input_price_per_million=Decimal("0.65"),
            output_price_per_million=Decimal("2.75"), status="completed", started_at=now, finished_at=now,
        )

    async def main():
        spool = UsageSpool(directory)
        for batch in range(batches):
            await spool.append([entry(batch * 4 + i) for i in range(4)])
            if batch % 3 == 2:
                await spool.seal()  # hand what was written so far to a replayer, as a replay round does
        print("written", flush=True)
        if sys.argv[4:] == ["hold"]:
            sys.stdin.readline()  # keep the segment (and its lock) until told

    asyncio.run(main())
    """
)


def start_writer(directory: Path, name: str, batches: int, *, hold: bool = False) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", WRITER, str(directory), name, str(batches), *(["hold"] if hold else [])]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def test_writer_processes_and_a_replayer_at_once_lose_and_double_nothing(spool_dir: Path) -> None:
    batches = 12
    writers = [start_writer(spool_dir, f"writer{n}", batches) for n in range(3)]
    replayer = UsageSpool(spool_dir)
    collected = Collector()
    while any(w.poll() is None for w in writers):
        await replayer.replay(collected)
        await asyncio.sleep(0.01)
    assert [w.returncode for w in writers] == [0, 0, 0]
    await replayer.replay(collected)
    ids = [e.request_id for e in collected.entries]
    assert len(ids) == len(set(ids)), "an entry was replayed twice"
    assert set(ids) == {f"writer{n}-{i}" for n in range(3) for i in range(batches * 4)}
    assert replayer.segments() == []


async def test_a_live_writers_segment_is_left_alone_and_taken_over_once_it_is_killed(spool_dir: Path) -> None:
    writer = start_writer(spool_dir, "held", 2, hold=True)
    try:
        assert writer.stdout is not None
        assert await asyncio.to_thread(writer.stdout.readline) == "written\n"
        replayer = UsageSpool(spool_dir)
        collected = Collector()
        await replayer.replay(collected)
        # Two batches and no seal: all 8 entries are in the segment the writer still holds.
        assert collected.entries == []
        assert len(replayer.segments()) == 1
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        result = await replayer.replay(collected)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert result.rows == 8
    assert {e.request_id for e in collected.entries} == {f"held-{i}" for i in range(8)}


def test_each_database_has_its_own_spool_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    one = spool_directory(data, "postgresql+asyncpg://gw:secret@db:5432/one")
    assert one.parent == data / "spool"
    assert one != spool_directory(data, "postgresql+asyncpg://gw:secret@db:5432/two")
    # The same database however its URL is spelled: another driver name, a changed password.
    assert one == spool_directory(data, "postgresql://gw:rotated@db:5432/one")
    # A relative SQLite path is a different file in another working directory.
    monkeypatch.chdir(tmp_path)
    here = spool_directory(data, "sqlite+aiosqlite:///./gateway.db")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert here != spool_directory(data, "sqlite+aiosqlite:///./gateway.db")


async def test_spooled_rows_reach_the_database_exactly_once_with_their_values(
    db_sessionmaker: Sessions, key_id: str, spool_dir: Path
) -> None:
    committed = [make_entry(key_id) for _ in range(3)]
    # Committed already, yet still spooled: a crash between a replay's commit and the file's removal.
    assert await insert_entries(db_sessionmaker, committed) == {}
    fresh = make_entry(key_id, input_price_per_million=Decimal("0.650"), user="end-user")
    writer = UsageSpool(spool_dir)
    await writer.append([*committed, fresh])
    writer.close()
    recorder = UsageRecorder(db_sessionmaker, spool=UsageSpool(spool_dir), replay_interval_s=0.05)
    recorder.start()
    try:
        await wait_until(lambda: recorder.replayed == 4, "the replay")
    finally:
        await recorder.aclose()
    assert recorder.rejected == 0
    assert writer.segments() == []
    assert await count_rows(db_sessionmaker, [e.request_id for e in [*committed, fresh]]) == 4
    async with db_sessionmaker() as session:
        row = await session.scalar(select(UsageRecord).where(UsageRecord.request_id == fresh.request_id))
    assert row is not None
    assert (row.input_price_per_million, row.input_cost, row.user) == (Decimal("0.65"), fresh.input_cost, "end-user")
    assert (row.started_at, row.finished_at) == (fresh.started_at, fresh.finished_at)


async def test_a_spooled_row_the_database_refuses_does_not_hold_back_the_others(
    db_sessionmaker: Sessions, key_id: str, spool_dir: Path
) -> None:
    good = [make_entry(key_id) for _ in range(4)]
    orphan = make_entry("no-such-key")
    writer = UsageSpool(spool_dir)
    await writer.append([*good[:2], orphan, *good[2:]])
    writer.close()
    recorder = UsageRecorder(db_sessionmaker, spool=UsageSpool(spool_dir), replay_interval_s=0.05)
    recorder.start()
    try:
        await wait_until(lambda: not writer.segments(), "the replay")
    finally:
        await recorder.aclose()
    assert (recorder.replayed, recorder.rejected) == (4, 1)
    assert await count_rows(db_sessionmaker, [e.request_id for e in good]) == 4


async def test_without_a_writable_spool_the_request_hears_of_it(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)  # no tables: every insert fails
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    recorder = UsageRecorder(make_sessionmaker(engine), retry_delays_s=FAST_RETRIES, spool=UsageSpool(blocked / "db"))
    recorder.start()
    try:
        with pytest.raises(UsageNotRecorded):
            await recorder.record(make_entry())
    finally:
        await recorder.aclose()
        await engine.dispose()
    assert (recorder.spooled, recorder.rejected) == (0, 1)


@pytest.fixture
async def proxied_sessions(postgres_server: PostgresServer) -> AsyncIterator[tuple[TcpProxy, Sessions, Sessions]]:
    """(proxy, sessions through the proxy, sessions around it) on a database of this test's own."""
    async with database_behind_proxy(postgres_server) as database:
        through, around = make_engine(database.url), make_engine(database.direct_url)
        try:
            yield database.proxy, make_sessionmaker(through), make_sessionmaker(around)
        finally:
            await through.dispose()
            await around.dispose()


@pytest.mark.postgres
async def test_while_postgres_is_away_rows_are_spooled_and_replayed_when_it_returns(
    proxied_sessions: tuple[TcpProxy, Sessions, Sessions], spool_dir: Path
) -> None:
    proxy, through, around = proxied_sessions
    key, _ = await KeyStore(around).create(NewKey(name="outage"))
    recorder = UsageRecorder(through, retry_delays_s=FAST_RETRIES, spool=UsageSpool(spool_dir), replay_interval_s=0.1)
    recorder.start()
    try:
        before = make_entry(key.id)
        await recorder.record(before)
        await proxy.cut()
        entries = [make_entry(key.id) for _ in range(20)]
        # Every record returns: the rows are durable on local disk instead.
        await asyncio.wait_for(asyncio.gather(*(recorder.record(e) for e in entries)), WAIT_S)
        assert recorder.spooled == 20
        assert recorder.spool_bytes > 0
        assert await count_rows(around, [e.request_id for e in entries]) == 0
        await proxy.restore()
        await wait_until(lambda: recorder.replayed == 20, "the replay")
        assert recorder.spool_bytes == 0
    finally:
        await recorder.aclose()
    assert recorder.rejected == 0
    assert await count_rows(around, [before.request_id, *(e.request_id for e in entries)]) == 21
