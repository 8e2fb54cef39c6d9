from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.usage import UsageEntry, spend_since, usage_report
from gateway.accounting.usage.rows import insert_entries

Sessions = async_sessionmaker[AsyncSession]
DAY1 = datetime(2025, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
DAY2 = datetime(2025, 3, 2, 0, 0, tzinfo=UTC)
PRICE_IN, PRICE_OUT = Decimal("0.65"), Decimal("2.75")


def entry(number: int, key_id: str, model: str, started: datetime, prompt: int, completion: int) -> UsageEntry:
    return UsageEntry(
        request_id=f"req-{number}",
        key_id=key_id,
        model=model,
        endpoint="/v1/chat/completions",
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_per_million=PRICE_IN,
        output_price_per_million=PRICE_OUT,
        status="completed",
        started_at=started,
        finished_at=started + timedelta(seconds=1),
    )


@pytest.fixture
async def keys(db_sessionmaker: Sessions) -> tuple[str, str]:
    store = KeyStore(db_sessionmaker)
    alice, _ = await store.create(NewKey(name="alice"))
    bob, _ = await store.create(NewKey(name="bob"))
    entries = [
        entry(1, alice.id, "llama-2-70b", DAY1, 100, 10),
        entry(2, alice.id, "llama-2-70b", DAY2, 200, 20),
        entry(3, alice.id, "smollm2", DAY2, 1, 1),
        entry(4, bob.id, "llama-2-70b", DAY2 + timedelta(hours=5), 3, 7),
    ]
    assert await insert_entries(db_sessionmaker, entries) == {}
    return alice.id, bob.id


async def test_grouped_by_key_with_names_and_exact_totals(db_sessionmaker: Sessions, keys: tuple[str, str]) -> None:
    alice, bob = keys
    report = await usage_report(db_sessionmaker, group_by="key")
    by_key = {row.group: row for row in report.rows}
    assert by_key[alice].label == "alice"
    assert (by_key[alice].requests, by_key[alice].prompt_tokens, by_key[alice].completion_tokens) == (
        3,
        301,
        31,
    )
    assert by_key[bob].input_cost == Decimal("0.00000195")
    assert by_key[bob].output_cost == Decimal("0.00001925")
    assert report.total.requests == 4
    assert report.total.total_tokens == 342
    assert report.total.input_cost == Decimal("304") * PRICE_IN / 1_000_000
    assert report.total.output_cost == Decimal("38") * PRICE_OUT / 1_000_000
    assert report.total.total_cost == report.total.input_cost + report.total.output_cost


async def test_grouped_by_model_and_by_utc_day(db_sessionmaker: Sessions, keys: tuple[str, str]) -> None:
    by_model = await usage_report(db_sessionmaker, group_by="model")
    assert [(r.group, r.requests) for r in by_model.rows] == [("llama-2-70b", 3), ("smollm2", 1)]
    by_day = await usage_report(db_sessionmaker, group_by="day")
    assert [(r.group, r.requests) for r in by_day.rows] == [("2025-03-01", 1), ("2025-03-02", 3)]
    assert by_day.rows[0].label is None


async def test_filters_by_key_model_and_time(db_sessionmaker: Sessions, keys: tuple[str, str]) -> None:
    alice, _ = keys
    only = await usage_report(db_sessionmaker, group_by="model", key_id=alice, model="llama-2-70b")
    assert [(r.group, r.requests) for r in only.rows] == [("llama-2-70b", 2)]
    # ``since`` is inclusive and ``until`` exclusive.
    day2 = await usage_report(db_sessionmaker, group_by="day", since=DAY2, until=DAY2 + timedelta(hours=5))
    assert [(r.group, r.requests) for r in day2.rows] == [("2025-03-02", 2)]
    empty = await usage_report(db_sessionmaker, since=DAY2 + timedelta(days=1))
    assert empty.rows == []
    assert empty.total.total_cost == 0
    assert empty.as_dict()["total"]["total_cost_usd"] == "0.0000000000"


async def test_spend_since_seeds_budgets(db_sessionmaker: Sessions, keys: tuple[str, str]) -> None:
    alice, bob = keys
    everything = await spend_since(db_sessionmaker, alice, None)
    assert everything == (Decimal(301) * PRICE_IN + Decimal(31) * PRICE_OUT) / 1_000_000
    assert (
        await spend_since(db_sessionmaker, alice, DAY2)
        == (Decimal(201) * PRICE_IN + Decimal(21) * PRICE_OUT) / 1_000_000
    )
    assert await spend_since(db_sessionmaker, bob, DAY2 + timedelta(days=1)) == 0
