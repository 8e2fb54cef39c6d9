from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal

import pytest

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import RedisLimiter
from gateway.errors import ApiError

pytestmark = pytest.mark.redis


async def test_replicas_share_one_rate_limit(
    redis_server: str, redis_prefix: str, make_key: Callable[..., ApiKeyInfo]
) -> None:
    replicas = [RedisLimiter.from_url(redis_server, prefix=redis_prefix) for _ in range(2)]
    key = make_key(rpm=2)
    try:
        await replicas[0].admit(key, max_tokens=1, worst_case_cost=Decimal(0))
        await replicas[1].admit(key, max_tokens=1, worst_case_cost=Decimal(0))
        for replica in replicas:
            with pytest.raises(ApiError, match="RPM"):
                await replica.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
    finally:
        for replica in replicas:
            await replica.aclose()


async def test_a_dead_replicas_slots_and_reservations_expire(
    redis_server: str, redis_prefix: str, make_key: Callable[..., ApiKeyInfo]
) -> None:
    limiter = RedisLimiter.from_url(redis_server, prefix=redis_prefix, lease_seconds=0.3)
    key = make_key(max_concurrency=1, budget_usd=Decimal("1"))
    try:
        await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.9"))  # never settled
        with pytest.raises(ApiError) as caught:
            await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.9"))
        assert "concurrent" in caught.value.message
        await asyncio.sleep(0.4)
        admission = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.9"))
        await admission.settle(1, Decimal("0.5"))
    finally:
        await limiter.aclose()


async def test_money_is_kept_as_exact_integers(
    redis_server: str, redis_prefix: str, make_key: Callable[..., ApiKeyInfo]
) -> None:
    limiter = RedisLimiter.from_url(redis_server, prefix=redis_prefix)
    key = make_key(budget_usd=Decimal("0.3"))
    try:
        for _ in range(3):  # 0.1 + 0.1 + 0.1 is not 0.3 in floats
            admission = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.1"))
            await admission.settle(1, Decimal("0.1"))
        with pytest.raises(ApiError, match="quota"):
            await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.00000001"))
    finally:
        await limiter.aclose()


async def test_an_unreachable_redis_refuses_requests_with_503(make_key: Callable[..., ApiKeyInfo]) -> None:
    limiter = RedisLimiter.from_url("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(ApiError) as caught:
            await limiter.admit(make_key(rpm=1), max_tokens=1, worst_case_cost=Decimal(0))
    finally:
        await limiter.aclose()
    assert (caught.value.status, caught.value.code) == (503, "limiter_unavailable")
    unlimited = await limiter.admit(make_key(), max_tokens=1, worst_case_cost=Decimal(0))
    assert unlimited.headers == {}
