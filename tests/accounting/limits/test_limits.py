"""Behaviour both limiters share, run against each (Redis: the machine's server)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import Admission, Limiter
from gateway.errors import ApiError

CENT = Decimal("0.01")
MakeLimiter = Callable[..., Limiter]
MakeKey = Callable[..., ApiKeyInfo]


def spend_of(amount: str) -> Callable[[str, datetime | None], Any]:
    async def load(key_id: str, since: datetime | None) -> Decimal:
        return Decimal(amount)

    return load


async def refused(admitting: asyncio.Future[Admission] | object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        await admitting  # type: ignore[misc]
    return caught.value


async def test_a_key_without_limits_is_admitted_without_headers(make_limiter: MakeLimiter, make_key: MakeKey) -> None:
    admission = await make_limiter().admit(make_key(), max_tokens=10**9, worst_case_cost=Decimal(10**6))
    assert admission.headers == {}
    await admission.settle(10, CENT)


async def test_requests_per_minute(make_limiter: MakeLimiter, make_key: MakeKey) -> None:
    limiter, key = make_limiter(), make_key(rpm=3)
    remaining = []
    for _ in range(3):
        admission = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
        remaining.append(admission.headers["x-ratelimit-remaining-requests"])
        assert admission.headers["x-ratelimit-limit-requests"] == "3"
    assert remaining == ["2", "1", "0"]
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0)))
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert "(RPM)" in error.message
    assert 15 <= int(error.headers["Retry-After"]) <= 21  # one request comes back every 20 s
    assert int(error.headers["retry-after-ms"]) > 0
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-reset-requests"].endswith("s")


async def test_tokens_per_minute_reserve_the_worst_case_and_refund_the_rest(
    make_limiter: MakeLimiter, make_key: MakeKey
) -> None:
    limiter, key = make_limiter(), make_key(tpm=1000)
    first = await limiter.admit(key, max_tokens=600, worst_case_cost=Decimal(0))
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "400"
    error = await refused(limiter.admit(key, max_tokens=600, worst_case_cost=Decimal(0)))
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert "Retry-After" in error.headers
    await first.settle(100, Decimal(0))  # used 100 of its 600
    second = await limiter.admit(key, max_tokens=600, worst_case_cost=Decimal(0))
    assert int(second.headers["x-ratelimit-remaining-tokens"]) in (300, 301)


async def test_a_request_larger_than_the_tpm_is_not_worth_retrying(
    make_limiter: MakeLimiter, make_key: MakeKey
) -> None:
    error = await refused(make_limiter().admit(make_key(tpm=1000), max_tokens=1001, worst_case_cost=CENT))
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert error.headers["x-should-retry"] == "false"
    assert "Retry-After" not in error.headers


async def test_concurrency_slots_and_idempotent_settle(make_limiter: MakeLimiter, make_key: MakeKey) -> None:
    limiter, key = make_limiter(), make_key(max_concurrency=2)
    a = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
    b = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0)))
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers["Retry-After"] == "1"
    await a.settle(1, Decimal(0))
    await a.settle(1, Decimal(0))  # a second settle must not free a second slot
    c = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
    await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0)))
    await b.settle(1, Decimal(0))
    await c.settle(1, Decimal(0))


async def test_an_exhausted_budget_says_do_not_retry(make_limiter: MakeLimiter, make_key: MakeKey) -> None:
    limiter = make_limiter(spend_of("0.95"))
    key = make_key(budget_usd=Decimal("1.00"))
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.10")))
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "insufficient_quota")
    assert error.headers == {"x-should-retry": "false"}
    assert "$1.00" in error.message
    admission = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.05"))
    await admission.settle(1, Decimal("0.05"))
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.0000001")))
    assert error.code == "insufficient_quota"


async def test_a_budget_held_by_requests_in_flight_is_worth_retrying(
    make_limiter: MakeLimiter, make_key: MakeKey
) -> None:
    limiter, key = make_limiter(), make_key(budget_usd=Decimal("1.00"))
    first = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.60"))
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.60")))
    assert (error.status, error.code) == (429, "rate_limit_exceeded")
    assert error.headers["Retry-After"] == "1"
    await first.settle(1, Decimal("0.10"))
    second = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.60"))
    await second.settle(1, Decimal("0.60"))
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.60")))
    assert error.code == "insufficient_quota"


async def test_concurrent_requests_cannot_overspend_a_budget(
    make_limiter: MakeLimiter, make_key: MakeKey, limiter_kind_name: str
) -> None:
    budget, worst = Decimal("0.50"), Decimal("0.01")
    key = make_key(budget_usd=budget)
    # Redis: two limiters, as two replicas sharing one budget.
    limiters = [make_limiter(spend_of("0")) for _ in range(2 if limiter_kind_name == "redis" else 1)]
    settled: list[Decimal] = []
    outcomes: dict[str, int] = {}
    rng = random.Random(7)

    async def one_request(number: int) -> None:
        limiter = limiters[number % len(limiters)]
        while True:
            try:
                admission = await limiter.admit(key, max_tokens=100, worst_case_cost=worst)
            except ApiError as error:
                if error.code == "insufficient_quota":
                    outcomes["refused"] = outcomes.get("refused", 0) + 1
                    return
                await asyncio.sleep(rng.uniform(0, 0.01))  # held by requests in flight: retry
                continue
            actual = Decimal(rng.randint(5, 10)) / 1000
            try:
                await asyncio.sleep(rng.uniform(0, 0.005))
            finally:
                settled.append(actual)
                await admission.settle(50, actual)
            outcomes["served"] = outcomes.get("served", 0) + 1
            return

    await asyncio.gather(*(one_request(n) for n in range(200)))
    spent = sum(settled, Decimal(0))
    assert spent <= budget
    assert spent > budget - worst  # and the budget was used up, not refused early
    assert outcomes["served"] + outcomes["refused"] == 200


async def test_spend_is_loaded_once_per_key_and_period(
    make_limiter: MakeLimiter, make_key: MakeKey, limiter_kind_name: str
) -> None:
    calls: list[datetime | None] = []

    async def load(key_id: str, since: datetime | None) -> Decimal:
        calls.append(since)
        await asyncio.sleep(0.01)
        return Decimal("0.90")

    limiter, key = make_limiter(load), make_key(budget_usd=Decimal("1.00"))
    admissions = await asyncio.gather(
        *(limiter.admit(key, max_tokens=1, worst_case_cost=CENT) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(a, Admission) for a in admissions)
    assert calls == [None] if limiter_kind_name == "memory" else 1 <= len(calls) <= 10
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=CENT))
    assert error.code == "rate_limit_exceeded"  # 0.90 spent + 10 cents reserved: full until they settle


async def test_a_daily_budget_starts_again_each_utc_day(make_limiter: MakeLimiter, make_key: MakeKey) -> None:
    today = datetime(2025, 5, 31, 23, 59, tzinfo=UTC)
    now = [today]
    spent = {today.replace(hour=0, minute=0): Decimal("2.00")}

    async def load(key_id: str, since: datetime | None) -> Decimal:
        assert since is not None
        return spent.get(since, Decimal(0))

    limiter = make_limiter(load, wall_clock=lambda: now[0])
    key = make_key(budget_usd=Decimal("2.00"), budget_period="daily")
    error = await refused(limiter.admit(key, max_tokens=1, worst_case_cost=CENT))
    assert error.code == "insufficient_quota"
    now[0] = today + timedelta(minutes=2)
    admission = await limiter.admit(key, max_tokens=1, worst_case_cost=CENT)
    await admission.settle(1, CENT)
