"""Many requests at once against a nearly spent budget: never overspent, every refusal a proper 429.

Runs the ``bench.faults.budget_race`` scenario: one gateway on SQLite with limits in its process,
and two gateways sharing PostgreSQL and Redis.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bench.faults import budget_race
from gateway.accounting.keys import ApiKeyInfo, KeyStore, NewKey
from gateway.accounting.limits import RedisLimiter
from gateway.errors import ApiError
from tests.support.databases import POSTGRES_URL, PostgresServer


def assert_budget_held(result: budget_race.BudgetRaceResult) -> None:
    assert result.ok, (result, result.notes)
    assert Decimal(result.spent_usd) <= Decimal(result.budget_usd)
    assert result.malformed_refusals == 0
    # The race was real: a few requests fit, most were turned away, none was lost or failed.
    assert 0 < result.served < result.sent
    assert result.served + result.refused == result.sent
    assert result.usage_rows == result.served


async def test_one_gateway_on_sqlite_never_overspends() -> None:
    assert_budget_held(await budget_race.run(1))


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_gateways_sharing_postgres_and_redis_never_overspend(
    postgres_server: PostgresServer, redis_server: str
) -> None:
    assert_budget_held(await budget_race.run(1, postgres_url=POSTGRES_URL, redis_url=redis_server, replicas=2))


@pytest.mark.long
async def test_a_thousand_requests_on_one_gateway_never_overspend() -> None:
    assert_budget_held(await budget_race.run(10))


@pytest.mark.long
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_thousand_requests_on_two_gateways_never_overspend(
    postgres_server: PostgresServer, redis_server: str
) -> None:
    assert_budget_held(await budget_race.run(10, postgres_url=POSTGRES_URL, redis_url=redis_server, replicas=2))


async def test_a_burst_with_a_key_not_in_the_cache_costs_the_database_one_lookup(
    db_sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    """What a replica meets when a race starts on a key it has not seen: one query, not one per request."""
    _, plaintext = await KeyStore(db_sessionmaker).create(NewKey(name="new to this replica"))
    replica = KeyStore(db_sessionmaker)
    queries: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "api_keys" in statement:
            queries.append(statement)

    engine = db_sessionmaker.kw["bind"].sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        found = await asyncio.gather(*(replica.authenticate(plaintext) for _ in range(200)))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert all(info is not None and info.name == "new to this replica" for info in found)
    assert len(queries) == 1


@pytest.mark.redis
async def test_a_burst_of_first_admissions_loads_the_spend_once(redis_server: str, redis_prefix: str) -> None:
    loads: list[str] = []

    async def spend_in_usage_table(key_id: str, since: datetime | None) -> Decimal:
        loads.append(key_id)
        await asyncio.sleep(0.05)  # a query takes a while: the burst arrives meanwhile
        return Decimal("0.5")

    limiter = RedisLimiter.from_url(redis_server, spend_in_usage_table, prefix=redis_prefix)
    key = ApiKeyInfo(
        id=str(uuid.uuid4()),
        name="budget",
        owner=None,
        metadata={},
        scope="user",
        prefix="sk-test…abcd",
        allowed_models=None,
        rpm=None,
        tpm=None,
        max_concurrency=None,
        budget_usd=Decimal("1"),
        budget_period="total",
        expires_at=None,
        revoked_at=None,
        created_at=datetime.now(UTC),
    )
    try:
        outcomes = await asyncio.gather(
            *(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.1")) for _ in range(200)),
            return_exceptions=True,
        )
    finally:
        await limiter.aclose()
    assert loads == [key.id]
    # The loaded spend counts: 0.5 of 1 is left, five reservations of 0.1.
    assert sum(not isinstance(outcome, BaseException) for outcome in outcomes) == 5
    assert all(
        isinstance(outcome, ApiError) and outcome.status == 429
        for outcome in outcomes
        if isinstance(outcome, BaseException)
    )
