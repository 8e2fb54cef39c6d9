"""Limits shared by every replica, kept in Redis and changed only by atomic Lua scripts.

Per key (``{prefix}:{<key id>}:...``, one hash slot per key for Redis Cluster): two token buckets
(``rpm``, ``tpm``), a sorted set of admissions in flight scored by lease expiry, a hash of their
budget reservations, and one spend hash per budget period. Money is kept as integer
hundred-millionths of a USD ("micro-cents"): ``INCRBYFLOAT`` and Lua numbers are floats, integers
below 2**53 are exact. Reservations and costs round up, so rounding can only make the limiter stricter.

The time is Redis's ``TIME``, so replicas with skewed clocks share one clock. A replica that dies
with requests in flight leaves their leases behind; they expire after ``lease_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits.base import (
    Admission,
    SpendLoader,
    budget_exhausted,
    budget_held,
    concurrency_exceeded,
    period_start,
    rate_headers,
    requests_exceeded,
    tokens_exceeded,
)
from gateway.accounting.limits.scripts import ADMIT, SETTLE
from gateway.errors import ApiError

logger = logging.getLogger(__name__)

UNITS_PER_USD = 10**8
_SETTLE_ATTEMPTS = 3
# Admission outcomes, as the admit script returns them.
_OK, _RPM, _TPM, _CONCURRENCY, _BUDGET, _UNSEEDED, _BUDGET_HELD = range(7)


def to_units(amount: Decimal, rounding: str = ROUND_CEILING) -> int:
    return int(amount.scaleb(8).to_integral_value(rounding=rounding))


PING_TIMEOUT_S = 2.0


class RedisLimiter:
    def __init__(
        self,
        client: aioredis.Redis,
        spend_loader: SpendLoader | None = None,
        *,
        prefix: str = "llama-gateway:limits",
        lease_seconds: float = 900.0,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._spend_loader = spend_loader
        self._prefix = prefix
        self._lease_ms = int(lease_seconds * 1000)
        self._wall_clock = wall_clock
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)

    @classmethod
    def from_url(cls, url: str, spend_loader: SpendLoader | None = None, **options: Any) -> RedisLimiter:
        return cls(aioredis.Redis.from_url(url), spend_loader, **options)

    async def admit(self, key: ApiKeyInfo, *, max_tokens: int, worst_case_cost: Decimal) -> Admission:
        if not key.has_limits:
            return Admission()
        start = period_start(key.budget_period, self._wall_clock())
        names = self._keys(key.id, start)
        admission_id = uuid.uuid4().hex
        cost_units = to_units(worst_case_cost)
        budget_units = -1 if key.budget_usd is None else to_units(key.budget_usd, ROUND_FLOOR)
        args: list[str | int] = [
            key.rpm or 0,
            key.tpm or 0,
            max_tokens,
            key.max_concurrency or 0,
            budget_units,
            cost_units,
            admission_id,
            self._lease_ms,
            self._spend_ttl(key),
        ]
        try:
            reply = await self._admit(keys=names, args=args)
            if int(reply[0]) == _UNSEEDED:
                await self._seed(key, start, names[4])
                reply = await self._admit(keys=names, args=args)
        except RedisError as exc:
            raise _unavailable() from exc
        outcome = int(reply[0])
        requests_left, tokens_left = float(reply[1]), float(reply[2])
        headers = rate_headers(key.rpm, requests_left, key.tpm, tokens_left)
        if outcome == _RPM:
            raise requests_exceeded(key, float(reply[3]) / 1000, headers)
        if outcome == _TPM:
            raise tokens_exceeded(key, max_tokens, float(reply[3]) / 1000, headers)
        if outcome == _CONCURRENCY:
            raise concurrency_exceeded(key)
        if outcome == _BUDGET:
            raise budget_exhausted(key)
        if outcome == _BUDGET_HELD:
            raise budget_held(key)
        if outcome != _OK:
            raise _unavailable()  # the period's spend vanished again right after it was loaded

        async def release(actual_tokens: int, actual_cost: Decimal) -> None:
            units = to_units(actual_cost)
            settle_args: list[str | int] = [admission_id, max_tokens, actual_tokens, key.tpm or 0, units]
            for attempt in range(1, _SETTLE_ATTEMPTS + 1):
                try:
                    await self._settle(keys=[names[1], names[2], names[3], names[4]], args=settle_args)
                    return
                except RedisError as exc:
                    # The lease frees the slot eventually; the spend is lost to Redis only, the row has it.
                    logger.warning("settling admission %s failed (try %d): %s", admission_id, attempt, exc)
                    await asyncio.sleep(0.05 * attempt)

        return Admission(headers, release)

    async def _seed(self, key: ApiKeyInfo, start: datetime | None, spend_key: str) -> None:
        spent = Decimal(0) if self._spend_loader is None else await self._spend_loader(key.id, start)
        ttl = self._spend_ttl(key)
        async with self._client.pipeline(transaction=True) as pipe:
            # HSETNX: when replicas seed together, the first one's value stands.
            pipe.hsetnx(spend_key, "base", to_units(spent))
            if ttl:
                pipe.expire(spend_key, ttl)
            await pipe.execute()

    def _keys(self, key_id: str, start: datetime | None) -> list[str]:
        base = f"{self._prefix}:{{{key_id}}}"
        period = "total" if start is None else start.strftime("%Y%m%d")
        return [f"{base}:{name}" for name in ("rpm", "tpm", "inflight", "reserved", f"spend:{period}")]

    @staticmethod
    def _spend_ttl(key: ApiKeyInfo) -> int:
        # A period's spend outlives the period by a day, for requests that straddle its end.
        return {"total": 0, "daily": 2 * 86400, "monthly": 32 * 86400}[key.budget_period]

    async def problem(self) -> str | None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            return f"redis: {type(exc).__name__}: {detail}".rstrip(": ")
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _unavailable() -> ApiError:
    return ApiError(
        503,
        "The rate limiter is unavailable; the request was not started. Please retry shortly.",
        type="server_error",
        code="limiter_unavailable",
        headers={"Retry-After": "1"},
    )
