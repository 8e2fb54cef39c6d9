from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.usage import RecorderClosed, UsageEntry, UsageNotRecorded, UsageRecorder
from gateway.accounting.usage import recorder as recorder_module
from gateway.accounting.usage.rows import RowWriter, insert_entries
from gateway.db import make_engine, make_sessionmaker, upgrade_database
from gateway.db.tables import UsageRecord
from tests.support.accounting_records import usage_entry as make_entry
from tests.support.databases import PostgresServer

Sessions = async_sessionmaker[AsyncSession]
FAST_RETRIES = (0.01, 0.01)


@pytest.fixture
async def key_id(db_sessionmaker: Sessions) -> str:
    info, _ = await KeyStore(db_sessionmaker).create(NewKey(name="usage"))
    return info.id


@pytest.fixture
async def observer(db_url_migrated: str) -> AsyncIterator[Sessions]:
    """A separate engine: what it sees is committed."""
    engine = make_engine(db_url_migrated)
    yield make_sessionmaker(engine)
    await engine.dispose()


async def count_rows(sessions: Sessions, request_ids: Sequence[str] | None = None) -> int:
    query = select(func.count()).select_from(UsageRecord)
    if request_ids is not None:
        query = query.where(UsageRecord.request_id.in_(request_ids))
    async with sessions() as session:
        return int(await session.scalar(query) or 0)


@asynccontextmanager
async def write_lock_held(sessions: Sessions) -> AsyncIterator[None]:
    """Hold the database's write lock from another connection, so the recorder's insert waits."""
    async with sessions() as session:
        connection = await session.connection()
        if connection.dialect.name == "postgresql":
            await session.execute(text("LOCK TABLE usage_records IN EXCLUSIVE MODE"))
        else:
            await session.execute(text("BEGIN IMMEDIATE"))
        try:
            yield
        finally:
            await session.commit()


def watch_inserts(monkeypatch: pytest.MonkeyPatch, before: Callable[[], None] | None = None) -> list[int]:
    """The sizes of the batches the recorder's writer commits, each one INSERT in autocommit mode.

    ``before`` runs ahead of each insert and may raise, as a database that fails would.
    """
    sizes: list[int] = []
    real_row_writer = recorder_module.row_writer

    def watched_row_writer(engine: AsyncEngine, *, lock_wait_s: float) -> RowWriter:
        writer = real_row_writer(engine, lock_wait_s=lock_wait_s)
        insert = writer.insert

        async def watched(entries: Sequence[UsageEntry]) -> dict[str, str]:
            if before is not None:
                before()
            refused = await insert(entries)
            sizes.append(len(entries))
            return refused

        writer.insert = watched  # type: ignore[method-assign]
        return writer

    monkeypatch.setattr(recorder_module, "row_writer", watched_row_writer)
    return sizes


async def test_concurrent_records_share_few_transactions(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = watch_inserts(monkeypatch)
    recorder = UsageRecorder(db_sessionmaker)  # no flush interval: grouping needs no timer
    recorder.start()
    entries = [make_entry(key_id) for _ in range(300)]
    try:
        await asyncio.gather(*(recorder.record(e) for e in entries))
    finally:
        await recorder.aclose()
    assert recorder.committed == sum(commits) == 300
    assert recorder.batches == len(commits)
    assert len(commits) <= 5, f"300 concurrent rows took {len(commits)} transactions"
    assert await count_rows(observer) == 300


async def test_rows_arriving_during_a_commit_share_the_next_one(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker)
    recorder.start()
    leader = make_entry(key_id)
    followers = [make_entry(key_id) for _ in range(40)]
    try:
        async with write_lock_held(observer):
            # The lone entry is taken at once, and its commit waits for the lock...
            first = asyncio.create_task(recorder.record(leader))
            while recorder.backlog == 0:  # noqa: ASYNC110 - the recorder has no event to wait on
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            # ...while these arrive: they queue behind it.
            rest = [asyncio.create_task(recorder.record(e)) for e in followers]
            await asyncio.sleep(0.1)
            assert recorder.backlog == 41
            assert not first.done()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    finally:
        await recorder.aclose()
    assert recorder.batches == 2, "the followers should have shared one commit after the leader's"
    assert recorder.committed == 41
    assert await count_rows(observer, [e.request_id for e in [leader, *followers]]) == 41


async def test_record_returns_only_once_the_row_is_committed(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker, flush_interval_s=0)
    recorder.start()
    entry = make_entry(key_id)
    try:
        async with write_lock_held(observer):
            task = asyncio.create_task(recorder.record(entry))
            await asyncio.sleep(0.3)
            assert not task.done(), "record() returned while its insert could not have committed"
            assert recorder.backlog == 1
        await asyncio.wait_for(task, 10)
        assert await count_rows(observer, [entry.request_id]) == 1
        assert recorder.backlog == 0
    finally:
        await recorder.aclose()


async def test_a_cancelled_request_still_gets_its_row(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker)
    recorder.start()
    entry = make_entry(key_id, status="cancelled", finish_reason=None)
    task = asyncio.create_task(recorder.record(entry))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await recorder.aclose()
    assert await count_rows(observer, [entry.request_id]) == 1


async def test_a_database_that_keeps_failing_is_reported_to_every_waiter(db_url: str) -> None:
    engine = make_engine(db_url)  # no tables: every insert fails
    recorder = UsageRecorder(make_sessionmaker(engine), retry_delays_s=FAST_RETRIES)
    recorder.start()
    try:
        results = await asyncio.gather(*(recorder.record(make_entry("k")) for _ in range(3)), return_exceptions=True)
    finally:
        await recorder.aclose()
        await engine.dispose()
    assert all(isinstance(r, UsageNotRecorded) for r in results)
    assert recorder.committed == 0
    assert recorder.rejected == 3
    assert recorder.failures >= len(FAST_RETRIES) + 1


async def test_a_transient_failure_is_retried(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def fail_first() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("connection lost")

    watch_inserts(monkeypatch, before=fail_first)
    recorder = UsageRecorder(db_sessionmaker, retry_delays_s=FAST_RETRIES)
    recorder.start()
    entry = make_entry(key_id)
    try:
        await recorder.record(entry)
    finally:
        await recorder.aclose()
    assert (recorder.failures, recorder.committed, recorder.rejected) == (1, 1, 0)
    assert await count_rows(observer, [entry.request_id]) == 1


async def test_an_entry_the_database_refuses_fails_alone(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker, flush_interval_s=0.01, retry_delays_s=FAST_RETRIES)
    recorder.start()
    good = [make_entry(key_id) for _ in range(5)]
    bad = make_entry("no-such-key")
    try:
        results = await asyncio.gather(*(recorder.record(e) for e in [*good, bad]), return_exceptions=True)
    finally:
        await recorder.aclose()
    assert results[:5] == [None] * 5
    assert isinstance(results[5], UsageNotRecorded)
    assert await count_rows(observer, [e.request_id for e in good]) == 5
    assert recorder.rejected == 1


async def test_a_retried_commit_never_duplicates_a_row(db_sessionmaker: Sessions, key_id: str) -> None:
    entries = [make_entry(key_id) for _ in range(3)]
    assert await insert_entries(db_sessionmaker, entries) == {}
    # The same rows again, as after a COMMIT whose reply was lost: accepted, not doubled.
    assert await insert_entries(db_sessionmaker, entries) == {}
    assert await count_rows(db_sessionmaker) == 3
    # Another request reusing an id is refused rather than silently merged.
    clash = make_entry(key_id, request_id=entries[0].request_id, prompt_tokens=999)
    refused = await insert_entries(db_sessionmaker, [clash, make_entry(key_id)])
    assert list(refused) == [clash.request_id]
    assert await count_rows(db_sessionmaker) == 4


async def test_aclose_commits_everything_queued_and_refuses_more(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker, flush_interval_s=0.05, max_batch=7)
    recorder.start()
    entries = [make_entry(key_id) for _ in range(50)]
    tasks = [asyncio.create_task(recorder.record(e)) for e in entries]
    await asyncio.sleep(0)
    await recorder.aclose()
    assert recorder.backlog == 0
    assert await count_rows(observer) == 50
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert recorder.batches >= 50 // 7
    with pytest.raises(RecorderClosed):
        await recorder.record(make_entry(key_id))


async def test_rows_keep_prices_costs_and_timings(db_sessionmaker: Sessions, key_id: str) -> None:
    recorder = UsageRecorder(db_sessionmaker)
    recorder.start()
    entry = make_entry(key_id, prompt_tokens=1000, completion_tokens=3, user="end-user-7")
    try:
        await recorder.record(entry)
    finally:
        await recorder.aclose()
    async with db_sessionmaker() as session:
        row = await session.scalar(select(UsageRecord).where(UsageRecord.request_id == entry.request_id))
    assert row is not None
    assert (row.input_cost, row.output_cost) == (Decimal("0.00065"), Decimal("0.00000825"))
    assert row.input_price_per_million == Decimal("0.65")
    assert (row.user, row.status, row.finish_reason, row.ttft_ms, row.duration_ms) == (
        "end-user-7",
        "completed",
        "stop",
        40,
        250,
    )
    assert row.started_at == entry.started_at


def test_entries_are_checked_where_they_are_made() -> None:
    with pytest.raises(ValueError, match="status"):
        make_entry("k", status="ok")
    with pytest.raises(ValueError, match="token"):
        make_entry("k", completion_tokens=-1)
    with pytest.raises(ValueError, match="timezone"):
        make_entry("k", started_at=datetime(2025, 1, 1))


async def test_a_lone_row_is_committed_by_record_itself_while_nothing_else_is_served(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer_batches = watch_inserts(monkeypatch)
    recorder = UsageRecorder(db_sessionmaker)
    recorder.commit_here_while(lambda: True)
    recorder.start()
    entry = make_entry(key_id)
    try:
        await recorder.record(entry)
        # Committed when record returned, whichever thread did it.
        assert await count_rows(observer, [entry.request_id]) == 1
    finally:
        await recorder.aclose()
    sqlite = db_sessionmaker.kw["bind"].dialect.name == "sqlite"
    # SQLite commits on the caller's thread; PostgreSQL's driver is asynchronous and keeps its path.
    assert (recorder.committed_here, writer_batches) == ((1, []) if sqlite else (0, [1]))
    assert (recorder.committed, recorder.batches) == (1, 1)


async def test_rows_go_through_the_writer_while_other_requests_are_served(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer_batches = watch_inserts(monkeypatch)
    others = 1
    recorder = UsageRecorder(db_sessionmaker)
    recorder.commit_here_while(lambda: others == 0)
    recorder.start()
    busy, quiet = make_entry(key_id), make_entry(key_id)
    try:
        await recorder.record(busy)
        others = 0
        await recorder.record(quiet)
    finally:
        await recorder.aclose()
    assert await count_rows(observer, [busy.request_id, quiet.request_id]) == 2
    sqlite = db_sessionmaker.kw["bind"].dialect.name == "sqlite"
    assert (recorder.committed_here, writer_batches) == ((1, [1]) if sqlite else (0, [1, 1]))


async def test_a_lone_row_meeting_a_locked_database_waits_in_the_writer_not_on_the_loop(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker)
    recorder.commit_here_while(lambda: True)
    recorder.start()
    entry = make_entry(key_id)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        async with write_lock_held(observer):
            task = asyncio.create_task(recorder.record(entry))
            await asyncio.sleep(0.3)
            # The loop kept turning while the row waited for the lock, queued for the writer.
            assert not task.done()
            assert recorder.backlog == 1
            assert ticks >= 10
        await asyncio.wait_for(task, 10)
    finally:
        ticker.cancel()
        await recorder.aclose()
    assert await count_rows(observer, [entry.request_id]) == 1
    assert (recorder.committed, recorder.committed_here) == (1, 0)


async def test_slow_commits_on_the_loop_send_rows_to_the_writer_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}"  # only SQLite's rows commit on the loop
    await upgrade_database(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    key, _ = await KeyStore(sessions).create(NewKey(name="usage"))
    monkeypatch.setattr(recorder_module, "SLOW_COMMIT_HERE_S", 0.0)  # every commit is a slow one
    writer_batches = watch_inserts(monkeypatch)
    recorder = UsageRecorder(sessions)
    recorder.commit_here_while(lambda: True)
    recorder.start()
    majority = recorder_module.COMMIT_HERE_WINDOW // 2 + 1
    entries = [make_entry(key.id) for _ in range(majority + 2)]
    try:
        for entry in entries:
            await recorder.record(entry)
        assert await count_rows(sessions, [e.request_id for e in entries]) == len(entries)
    finally:
        await recorder.aclose()
        await engine.dispose()
    assert (recorder.committed_here, writer_batches) == (majority, [1, 1])
    assert "rows go through the writer thread for 60 s" in caplog.text
    assert f"most of the last {recorder_module.COMMIT_HERE_WINDOW} usage commits" in caplog.text


def test_commits_held_up_by_the_machine_do_not_stop_the_loop_committing() -> None:
    times = recorder_module.LoopCommitTimes()
    limit = recorder_module.SLOW_COMMIT_HERE_S
    window = recorder_module.COMMIT_HERE_WINDOW
    # A burst at start-up: just under half a window of commits held up for a long while.
    assert not any(times.too_slow_after(10) for _ in range(window // 2))
    assert not any(times.too_slow_after(limit / 10) for _ in range(window))
    assert times.slow == 0  # and it is forgotten
    # Held-up commits now and then, however many in all, never make a majority.
    assert not any(times.too_slow_after(10 if n % 3 == 0 else limit / 10) for n in range(10 * window))


def test_a_disk_that_stays_slow_stops_the_loop_committing_within_a_majority_of_the_window() -> None:
    times = recorder_module.LoopCommitTimes()
    limit = recorder_module.SLOW_COMMIT_HERE_S
    window = recorder_module.COMMIT_HERE_WINDOW
    verdicts = [times.too_slow_after(1.5 * limit) for _ in range(window)]
    assert verdicts.index(True) == window // 2  # the 9th slow commit of 16
    assert verdicts.count(True) == 1  # counted afresh once the loop tries again: 7 are no majority
    # A disk that is slow now and then, but most often, is as slow.
    verdicts = [times.too_slow_after(1.5 * limit if n % 3 else limit / 10) for n in range(2 * window)]
    assert True in verdicts


async def test_a_lone_row_the_database_refuses_is_reported_as_any_other(
    db_sessionmaker: Sessions, key_id: str, observer: Sessions
) -> None:
    recorder = UsageRecorder(db_sessionmaker, retry_delays_s=FAST_RETRIES)
    recorder.commit_here_while(lambda: True)
    recorder.start()
    bad = make_entry("no-such-key")
    good = make_entry(key_id)
    try:
        with pytest.raises(UsageNotRecorded):
            await recorder.record(bad)
        await recorder.record(good)  # the loop's connection was replaced and serves again
    finally:
        await recorder.aclose()
    assert (recorder.rejected, recorder.committed) == (1, 1)
    assert await count_rows(observer) == 1


@pytest.mark.postgres
async def test_a_value_postgresql_cannot_store_fails_its_row_alone_and_the_writer_carries_on(
    postgres_server: PostgresServer,
) -> None:
    url = await postgres_server.create(migrated=True)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        key, _ = await KeyStore(sessions).create(NewKey(name="usage"))
        recorder = UsageRecorder(sessions, retry_delays_s=FAST_RETRIES)
        recorder.start()
        too_many = make_entry(key.id, prompt_tokens=2**31)  # beyond the INTEGER column
        good = [make_entry(key.id) for _ in range(3)]
        try:
            results = await asyncio.gather(*(recorder.record(e) for e in [too_many, *good]), return_exceptions=True)
            later = make_entry(key.id)
            await recorder.record(later)  # on a fresh connection after the refusal
        finally:
            await recorder.aclose()
        assert isinstance(results[0], UsageNotRecorded)
        assert results[1:] == [None] * 3
        assert (recorder.rejected, recorder.committed) == (1, 4)
        assert await count_rows(sessions) == 4
    finally:
        await engine.dispose()
        await postgres_server.drop(url)
