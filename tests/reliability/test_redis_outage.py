"""Redis goes away (reset, or hung) under load and comes back: the shared limiter fails closed with
503, never hangs, and leaks nothing once Redis returns.

The machine's Redis is never touched: a ``StallingTcpProxy`` in front of it is what goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from bench.faults import redis_outage
from bench.faults.harness import StallingTcpProxy
from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import RedisLimiter
from gateway.errors import ApiError
from tests.support.accounting_records import key_info as make_key

pytestmark = pytest.mark.redis

# Far above what the limiter's timeouts allow (a few seconds): reaching it means a hang.
NO_HANG_S = 30.0
POLL_S = 0.02


def assert_failed_closed_and_recovered(result: redis_outage.RedisOutageResult) -> None:
    assert result.ok, (result, result.notes)
    assert result.refused_while_away > 0
    assert result.wrong_while_away == 0
    assert result.unlimited_failures == 0
    assert result.streams_cut == 0
    assert result.held_after == 0
    assert result.slots_refused_after == 0
    assert result.exact_fit_ok
    assert result.server_errors == 0


async def test_redis_cut_off_under_load(redis_server: str) -> None:
    assert_failed_closed_and_recovered(await redis_outage.run(1, redis_url=redis_server))


async def test_redis_hanging_under_load(redis_server: str) -> None:
    assert_failed_closed_and_recovered(await redis_outage.run(1, redis_url=redis_server, hang=True))


@pytest.mark.long
@pytest.mark.parametrize("hang", [False, True], ids=["cut-off", "hanging"])
async def test_redis_away_under_more_load(redis_server: str, hang: bool) -> None:
    assert_failed_closed_and_recovered(await redis_outage.run(5, redis_url=redis_server, hang=hang))


@pytest.fixture
async def proxy(redis_server: str) -> AsyncIterator[StallingTcpProxy]:
    target = urlsplit(redis_server)
    proxy = StallingTcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    yield proxy
    await proxy.aclose()


@pytest.fixture
async def make_limiter(
    redis_server: str, redis_prefix: str, proxy: StallingTcpProxy
) -> AsyncIterator[Callable[..., RedisLimiter]]:
    """Limiters reaching the test Redis through ``proxy``, under this test's own key prefix."""
    made: list[RedisLimiter] = []
    proxied = urlunsplit(urlsplit(redis_server)._replace(netloc=f"127.0.0.1:{proxy.port}"))

    def build(**options: Any) -> RedisLimiter:
        limiter = RedisLimiter.from_url(proxied, prefix=redis_prefix, **options)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


async def held(redis_server: str, prefix: str, key: ApiKeyInfo) -> tuple[int, int]:
    """(slots, budget reservations) the key holds in Redis, read past the proxy."""
    client = Redis.from_url(redis_server)
    try:
        base = f"{prefix}:{{{key.id}}}"
        return int(await client.zcard(f"{base}:inflight")), int(await client.hlen(f"{base}:reserved"))
    finally:
        await client.aclose()


async def until_settled(limiter: RedisLimiter) -> None:
    """Wait until the limiter has handed Redis every settlement it deferred."""
    for _ in range(int(NO_HANG_S / POLL_S)):
        if not limiter.deferred_settlements:
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{limiter.deferred_settlements} settlements still wait for Redis")


async def test_a_redis_that_accepts_and_never_answers_is_refused_not_waited_for() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads what it is sent and never answers
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        async with asyncio.timeout(NO_HANG_S):
            with pytest.raises(ApiError) as refused:
                await limiter.admit(make_key(rpm=10), max_tokens=1, worst_case_cost=Decimal(0))
    finally:
        await limiter.aclose()
        server.close()
        await server.wait_closed()
    assert (refused.value.status, refused.value.code) == (503, "limiter_unavailable")
    assert refused.value.headers["Retry-After"] == "1"


async def test_a_burst_beyond_the_connection_pool_waits_for_a_connection(
    make_limiter: Callable[..., RedisLimiter],
) -> None:
    limiter = make_limiter()
    key = make_key(rpm=10_000)
    admissions = await asyncio.gather(
        *(limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0)) for _ in range(400))
    )
    assert len(admissions) == 400


async def test_a_settlement_made_while_redis_is_away_is_applied_when_it_returns(
    make_limiter: Callable[..., RedisLimiter], proxy: StallingTcpProxy, redis_server: str, redis_prefix: str
) -> None:
    limiter = make_limiter()
    key = make_key(max_concurrency=1, budget_usd=Decimal("1"))
    admission = await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal("0.6"))
    await proxy.cut()
    await admission.settle(5, Decimal("0.3"))
    assert limiter.deferred_settlements == 1
    assert await held(redis_server, redis_prefix, key) == (1, 1)
    with pytest.raises(ApiError) as refused:
        await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal("0.1"))
    assert refused.value.status == 503
    await proxy.restore()
    await until_settled(limiter)
    assert await held(redis_server, redis_prefix, key) == (0, 0)
    # The settled cost counts: 0.3 spent leaves room for 0.7, not one cent more.
    with pytest.raises(ApiError, match="quota"):
        await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal("0.70000001"))
    fitting = await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal("0.7"))
    await fitting.settle(1, Decimal("0.1"))


async def test_an_admission_whose_reply_hung_leaves_nothing_held(
    make_limiter: Callable[..., RedisLimiter], proxy: StallingTcpProxy, redis_server: str, redis_prefix: str
) -> None:
    limiter = make_limiter()
    key = make_key(max_concurrency=1, budget_usd=Decimal("1"))
    first = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.1"))  # seeds the spend
    await first.settle(1, Decimal(0))
    proxy.stall()
    with pytest.raises(ApiError) as refused:
        async with asyncio.timeout(NO_HANG_S):
            await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("0.9"))
    assert refused.value.status == 503
    # The call that hung may reach Redis after all once the proxy lets it through: the
    # admission withdrawn meanwhile must take neither the slot nor the budget.
    proxy.flow()
    await until_settled(limiter)
    assert await held(redis_server, redis_prefix, key) == (0, 0)
    again = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal("1"))
    await again.settle(1, Decimal(0))


async def test_a_dead_replicas_lost_reservation_makes_the_spend_reload_from_the_usage_table(
    redis_server: str, redis_prefix: str
) -> None:
    key = make_key(budget_usd=Decimal("1"))
    recorded = Decimal(0)

    async def spend_in_usage_table(key_id: str, since: datetime | None) -> Decimal:
        return recorded

    dying = RedisLimiter.from_url(redis_server, spend_in_usage_table, prefix=redis_prefix, lease_seconds=0.2)
    survivor = RedisLimiter.from_url(redis_server, spend_in_usage_table, prefix=redis_prefix)
    try:
        await dying.admit(key, max_tokens=1, worst_case_cost=Decimal("0.9"))
        # The replica dies after its request's row (cost 0.4) was committed, before settling.
        recorded = Decimal("0.4")
        await asyncio.sleep(0.3)
        with pytest.raises(ApiError, match="quota"):
            await survivor.admit(key, max_tokens=1, worst_case_cost=Decimal("0.61"))
        admitted = await survivor.admit(key, max_tokens=1, worst_case_cost=Decimal("0.6"))
        await admitted.settle(1, Decimal("0.6"))
    finally:
        await dying.aclose()
        await survivor.aclose()
