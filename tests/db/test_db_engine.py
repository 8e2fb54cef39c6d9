from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.db import (
    DatabaseAhead,
    DatabaseBehind,
    async_url,
    database_revision,
    ensure_database_current,
    head_revision,
    is_sqlite,
    make_engine,
    make_sessionmaker,
    pending_migrations,
    upgrade_database,
)
from gateway.db.tables import ApiKey, Base


async def test_upgrade_creates_tables_and_report_indexes(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert await pending_migrations(engine)
        await upgrade_database(db_url)
        assert await database_revision(engine) == head_revision()
        assert not await pending_migrations(engine)

        def describe(connection: object) -> tuple[set[str], set[tuple[str, ...]]]:
            inspector = inspect(connection)
            indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes("usage_records")}
            return set(inspector.get_table_names()), indexes  # type: ignore[arg-type]

        async with engine.connect() as connection:
            tables, indexes = await connection.run_sync(describe)
        assert {"api_keys", "usage_records", "alembic_version"} <= tables
        assert {("key_id", "started_at"), ("model", "started_at")} <= indexes
    finally:
        await engine.dispose()


async def test_upgrade_twice_is_a_no_op(db_url: str) -> None:
    await upgrade_database(db_url)
    await upgrade_database(db_url)
    engine = make_engine(db_url)
    try:
        await ensure_database_current(engine)
    finally:
        await engine.dispose()


async def test_empty_database_is_behind_with_an_actionable_message(db_url: str) -> None:
    if is_sqlite(db_url):
        engine = make_engine(db_url)
    else:
        # The test server trusts local connections, so a password is accepted and must stay hidden.
        engine = make_engine(make_url(db_url).set(password="s3cret").render_as_string(hide_password=False))
    try:
        with pytest.raises(DatabaseBehind) as caught:
            await ensure_database_current(engine)
    finally:
        await engine.dispose()
    assert caught.value.current is None
    assert caught.value.head == head_revision()
    assert "llama-gateway db upgrade" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_database_migrated_by_a_newer_release_is_ahead(db_url_migrated: str) -> None:
    engine = make_engine(db_url_migrated)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
        with pytest.raises(DatabaseAhead, match="f00dfeed"):
            await ensure_database_current(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u:p@h:5433/db", "postgresql+asyncpg://u:p@h:5433/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("sqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
        ("sqlite+aiosqlite:///./x.db", "sqlite+aiosqlite:///./x.db"),
    ],
)
def test_async_url_picks_the_async_driver(given: str, expected: str) -> None:
    assert async_url(given) == expected


async def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: object) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/wal.db")
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await connection.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar() == 10000
    finally:
        await engine.dispose()


def _key_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": "k1",
        "name": "n",
        "owner": None,
        "metadata_": {},
        "scope": "user",
        "key_hash": "h" * 64,
        "prefix": "sk-abcd…wxyz",
        "allowed_models": None,
        "budget_period": "total",
        "created_at": datetime.now(UTC),
    }
    row.update(changes)
    return row


async def _insert_key(sessionmaker: async_sessionmaker[AsyncSession], row: dict[str, object]) -> None:
    async with sessionmaker.begin() as session:
        await session.execute(insert(ApiKey), [row])


@pytest.mark.parametrize(
    "amount",
    [Decimal("0.0000000001"), Decimal("123456789.0123456789"), Decimal("0.3"), Decimal("0")],
)
async def test_money_round_trips_exactly(db_url_migrated: str, amount: Decimal) -> None:
    engine = make_engine(db_url_migrated)
    sessionmaker = make_sessionmaker(engine)
    try:
        await _insert_key(sessionmaker, _key_row(budget_usd=amount))
        async with sessionmaker() as session:
            stored = await session.scalar(select(ApiKey.budget_usd))
        assert stored == amount
        assert isinstance(stored, Decimal)
    finally:
        await engine.dispose()


async def test_money_with_more_than_ten_places_is_refused(db_url_migrated: str) -> None:
    engine = make_engine(db_url_migrated)
    sessionmaker = make_sessionmaker(engine)
    try:
        with pytest.raises(Exception, match="decimal places"):
            await _insert_key(sessionmaker, _key_row(budget_usd=Decimal("0.00000000001")))
    finally:
        await engine.dispose()


async def test_timestamps_come_back_aware_and_in_utc(db_url_migrated: str) -> None:
    engine = make_engine(db_url_migrated)
    sessionmaker = make_sessionmaker(engine)
    local = datetime(2025, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5)))
    try:
        await _insert_key(sessionmaker, _key_row(created_at=local))
        async with sessionmaker() as session:
            stored = await session.scalar(select(ApiKey.created_at))
        assert stored == local
        assert stored is not None
        assert stored.tzinfo == UTC
        naive = _key_row(id="k2", key_hash="g" * 64, created_at=datetime(2025, 1, 1))
        with pytest.raises(Exception, match="naive"):
            await _insert_key(sessionmaker, naive)
    finally:
        await engine.dispose()


async def test_the_migrations_build_exactly_the_models(db_url_migrated: str) -> None:
    engine = make_engine(db_url_migrated)

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()
