"""Redis outage: the shared limiter's Redis goes away in the middle of load, then comes back.

The gateway reaches Redis through a proxy that the scenario controls (the machine's Redis is
never touched). A key with a budget and a concurrency limit fills its slots with streams; then
Redis is cut off (``hang=False``: connections reset and refused) or hangs (``hang=True``: it
accepts and never answers). While it is away:

- requests of the limited key are refused with 503, ``Retry-After`` and ``limiter_unavailable``
  in OpenAI's envelope (fail closed: no request runs unmetered, no budget is overspent), and
  answered within the limiter's timeouts, not hung;
- a key without limits never needs Redis and is served;
- the streams admitted before the cut finish and are billed; their settlements wait for Redis.

Once Redis is back the deferred settlements go through: nothing stays reserved, the key's slots
can all be used at once, and a budget set to the key's recorded spend plus one request's worst
case admits that request and refuses the next for quota. ``run`` is ``async``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis.asyncio import Redis

from bench.faults.harness import StallingTcpProxy
from bench.faults.live import (
    LiveGateway,
    bearer,
    exact_fit,
    forget_redis_limits,
    is_openai_error,
    migrated_sqlite,
    scripted_model,
    serving,
    usage_rows,
)
from bench.faults.report import ScenarioResult
from gateway.accounting.limits import RedisLimiter
from gateway.accounting.limits.redis_limiter import DEFAULT_PREFIX
from gateway.settings import Settings

REDIS_URL = os.environ.get("LLAMA_GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SLOTS_PER_SCALE = 4
"""The limited key's max_concurrency, all of it streaming when Redis goes away."""
REQUESTS_PER_SCALE = 20
"""Requests of each key while Redis is away."""
SETTLE_WAIT_S = 60.0
POLL_S = 0.05
MODEL = scripted_model(
    "scripted",
    price_in=Decimal(1000),
    price_out=Decimal(10000),
    max_concurrency=64,
    max_queue=1024,
    reply="one two three four five six seven eight nine ten eleven twelve",
    token_delay_ms=40,
)
BODY = {"model": "scripted", "messages": [{"role": "user", "content": "Count to twelve."}], "max_tokens": 16}


@dataclass
class RedisOutageResult(ScenarioResult):
    refused_while_away: int = 0
    """Limited requests refused as they must be: 503, Retry-After, ``limiter_unavailable``."""
    wrong_while_away: int = 0
    """Limited requests answered otherwise while Redis was away (served, hung, other errors)."""
    unlimited_failures: int = 0
    """Requests of the key without limits that were not served while Redis was away."""
    streams_cut: int = 0
    """Streams admitted before the outage that did not finish with ``[DONE]``."""
    held_after: int = 0
    """Slots and reservations of the limited key left in Redis once it was back and settled."""
    slots_refused_after: int = 0
    """Of max_concurrency requests sent together after the outage, those not served."""
    exact_fit_ok: bool = False

    @property
    def ok(self) -> bool:
        return (
            super().ok
            and self.wrong_while_away == 0
            and self.unlimited_failures == 0
            and self.streams_cut == 0
            and self.held_after == 0
            and self.slots_refused_after == 0
            and self.exact_fit_ok
        )


async def run(scale: int = 1, *, redis_url: str = REDIS_URL, hang: bool = False) -> RedisOutageResult:
    target = urlsplit(redis_url)
    proxy = StallingTcpProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await proxy.start()
    proxied = urlunsplit(target._replace(netloc=f"127.0.0.1:{proxy.port}"))
    try:
        with tempfile.TemporaryDirectory(prefix="redis-outage-") as directory:
            return await _outage(scale, await migrated_sqlite(Path(directory)), proxy, proxied, redis_url, hang)
    finally:
        await proxy.aclose()


async def _outage(
    scale: int, database_url: str, proxy: StallingTcpProxy, proxied_url: str, redis_url: str, hang: bool
) -> RedisOutageResult:
    slots = SLOTS_PER_SCALE * scale
    away = REQUESTS_PER_SCALE * scale
    settings = Settings(database_url=database_url, redis_url=proxied_url, log_level="warning", models=[MODEL])
    async with serving(settings) as gateway:
        limited_id, limited = await gateway.create_key(name="limited", max_concurrency=slots, budget_usd="100")
        _, unlimited = await gateway.create_key(name="unlimited")
        try:
            begun = [asyncio.Event() for _ in range(slots)]
            streams = [asyncio.create_task(_stream_to_end(gateway, limited, event)) for event in begun]
            await asyncio.gather(*(event.wait() for event in begun))
            if hang:
                proxy.stall()
            else:
                await proxy.cut()
            refused, unlimited_served, ready_status = await asyncio.gather(
                _requests(gateway, limited, away), _requests(gateway, unlimited, away), _ready_status(gateway)
            )
            streamed = await asyncio.gather(*streams)
            if hang:
                proxy.flow()
            else:
                await proxy.restore()
            await _settled(gateway)
            held = await _held(redis_url, limited_id)
            after = await _requests(gateway, limited, slots)
            fit = await exact_fit(gateway, limited_id, limited, database_url, BODY, MODEL)
        finally:
            await forget_redis_limits(redis_url, limited_id)
    rows = await usage_rows(database_url)
    statuses = Counter(_status(r) for r in [*refused, *unlimited_served, *after])
    admitted_streams = sum(admitted for admitted, _ in streamed)
    sent = slots + 2 * away + slots + fit.sent
    served = sum(finished for _, finished in streamed) + statuses[200] + fit.served
    result = RedisOutageResult(
        name=f"redis outage ({'hangs' if hang else 'cut off'})",
        sent=sent,
        served=served,
        failed=sent - served,
        usage_rows=len(rows),
        expected_rows=admitted_streams + statuses[200] + fit.served,
        server_errors=sum(n for status, n in statuses.items() if status >= 500 and status != 503),
        refused_while_away=sum(_refused_as_it_must(r) for r in refused),
        wrong_while_away=sum(not _refused_as_it_must(r) for r in refused),
        unlimited_failures=sum(_status(r) != 200 for r in unlimited_served),
        streams_cut=sum(not finished for _, finished in streamed),
        held_after=held,
        slots_refused_after=sum(_status(r) != 200 for r in after),
        exact_fit_ok=fit.ok,
    )
    result.notes.append(
        f"while away: limited {dict(Counter(_status(r) for r in refused))}, /ready {ready_status}; "
        f"after: {held} held in Redis, exact fit {fit.fitting_status} then {fit.beyond_code}"
    )
    return result


async def _stream_to_end(gateway: LiveGateway, key: str, begun: asyncio.Event) -> tuple[bool, bool]:
    """Stream one completion, setting ``begun`` at its first content: (admitted, ended with [DONE])."""
    admitted = finished = False
    try:
        async with (
            httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as response,
        ):
            admitted = response.status_code == 200
            async for line in response.aiter_lines():
                if '"content"' in line:
                    begun.set()
                finished = finished or line == "data: [DONE]"
    except httpx.TransportError:
        pass
    finally:
        begun.set()
    return admitted, finished


async def _requests(gateway: LiveGateway, key: str, count: int) -> list[httpx.Response | None]:
    """``count`` non-streamed requests at once; None where no answer came (cut, or hung past 60 s)."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=60) as client:

        async def one() -> httpx.Response | None:
            try:
                return await client.post("/v1/chat/completions", json=BODY)
            except httpx.TransportError:
                return None

        return await asyncio.gather(*(one() for _ in range(count)))


async def _ready_status(gateway: LiveGateway) -> int:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60) as client:
        return (await client.get("/ready")).status_code


def _status(response: httpx.Response | None) -> int:
    return 0 if response is None else response.status_code


def _refused_as_it_must(response: httpx.Response | None) -> bool:
    return (
        response is not None
        and response.status_code == 503
        and "retry-after" in response.headers
        and is_openai_error(response)
        and response.json()["error"]["code"] == "limiter_unavailable"
    )


async def _settled(gateway: LiveGateway) -> None:
    """Wait (a while) until the gateway has handed Redis every settlement it deferred.

    The limiter lives on the gateway's own thread and loop: its count is polled, not awaited.
    What is still deferred afterwards shows as slots and reservations held in Redis.
    """
    limiter = gateway.state.accounting.limiter
    assert isinstance(limiter, RedisLimiter)
    for _ in range(int(SETTLE_WAIT_S / POLL_S)):
        if not limiter.deferred_settlements:
            return
        await asyncio.sleep(POLL_S)


async def _held(redis_url: str, key_id: str) -> int:
    """Slots and budget reservations of the key in Redis itself (read past the proxy)."""
    client = Redis.from_url(redis_url)
    try:
        base = f"{DEFAULT_PREFIX}:{{{key_id}}}"
        return int(await client.zcard(f"{base}:inflight")) + int(await client.hlen(f"{base}:reserved"))
    finally:
        await client.aclose()
