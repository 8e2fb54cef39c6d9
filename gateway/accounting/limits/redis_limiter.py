"""Limits shared by every replica, kept in Redis and changed only by atomic Lua scripts.

Per key (``{prefix}:{<key id>}:...``, one hash slot per key for Redis Cluster): two token buckets
(``rpm``, ``tpm``), a sorted set of admissions in flight scored by lease expiry, a hash of their
budget reservations, and one spend hash per budget period. Money is kept as integer
hundred-millionths of a USD ("micro-cents"): ``INCRBYFLOAT`` and Lua numbers are floats, integers
below 2**53 are exact. Reservations and costs round up, so rounding can only make the limiter stricter.

The time is Redis's ``TIME``, so replicas with skewed clocks share one clock.

When Redis is out of reach the limiter fails closed: a request whose key has limits is refused
with 503 and ``Retry-After`` (each command waits at most ``COMMAND_TIMEOUT_S``, with one retry on
a fresh connection), and keys without limits never ask Redis. A request admitted before Redis
went away settles when it comes back: settlements Redis did not take are retried in the
background, in order, until their lease runs out. An admission whose reply was lost may have
happened in Redis, or may yet happen (a command stuck on a hung connection): it is withdrawn the
same way, which frees what it took and makes a late arrival of it take nothing.

A replica that dies with requests in flight leaves their leases behind; they expire after
``lease_seconds``, freeing their slots, and the next admission of the key notices the lost
reservations and reloads the period's spend from the usage table, where those requests' rows are.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
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
DEFAULT_PREFIX = "llama-gateway:limits"
# What a lost or hung Redis costs a request before it is refused: a connection within
# CONNECT_TIMEOUT_S, a reply within COMMAND_TIMEOUT_S, one more try on a fresh connection (a
# pooled one may be dead after Redis restarted). Options in ``redis_url``'s query string win.
CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0
COMMAND_RETRIES = 1
# A burst of admissions waits for one of the pool's connections (up to POOL_WAIT_S) rather than
# failing at once when all are busy, as redis-py's default pool does past 100.
MAX_CONNECTIONS = 100
POOL_WAIT_S = 5.0
# Settlements Redis did not take are retried with a growing pause between rounds.
RETRY_FIRST_PAUSE_S = 0.05
RETRY_MAX_PAUSE_S = 2.0
SEED_TIMEOUT_S = 5.0
"""How long a period's spend may take to load from the usage table before admissions get 503."""
MAX_DEFERRED_SETTLEMENTS = 100_000
"""Beyond this many the oldest are dropped; their leases expire and their spend is reloaded."""
_UNREACHABLE = (RedisError, OSError, TimeoutError)
# Admission outcomes, as the admit script returns them.
_OK, _RPM, _TPM, _CONCURRENCY, _BUDGET, _UNSEEDED, _BUDGET_HELD, _WITHDRAWN = range(8)


def to_units(amount: Decimal, rounding: str = ROUND_CEILING) -> int:
    return int(amount.scaleb(8).to_integral_value(rounding=rounding))


PING_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class _Settlement:
    admission_id: str
    keys: list[str]
    args: list[str | int]
    deadline: float
    """Event-loop time when the admission's lease runs out; settling later is of no use."""


class RedisLimiter:
    def __init__(
        self,
        client: aioredis.Redis,
        spend_loader: SpendLoader | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
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
        self._deferred: OrderedDict[str, _Settlement] = OrderedDict()
        self._retrier: asyncio.Task[None] | None = None
        # Concurrent first admissions of a period share one read of its spend from the database.
        self._seeding: dict[str, asyncio.Future[None]] = {}

    @classmethod
    def from_url(cls, url: str, spend_loader: SpendLoader | None = None, **options: Any) -> RedisLimiter:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(NoBackoff(), COMMAND_RETRIES),
        )
        return cls(aioredis.Redis.from_pool(pool), spend_loader, **options)

    @property
    def deferred_settlements(self) -> int:
        """Settlements waiting for Redis to come back."""
        return len(self._deferred)

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
        settle_keys = [names[1], names[2], names[3], names[4], names[5]]
        tracked = int(key.max_concurrency is not None or key.budget_usd is not None)
        deadline = asyncio.get_running_loop().time() + self._lease_ms / 1000
        try:
            reply = await self._admit(keys=names, args=args)
            if int(reply[0]) == _UNSEEDED:
                await self._shared_seed(key, start, names[4])
                reply = await self._admit(keys=names, args=args)
        except _UNREACHABLE as exc:
            if tracked:
                # The script may have run with its reply lost, or may yet run: withdraw the admission
                # once Redis answers. Nothing was used: no tokens are given back, nothing is spent.
                withdraw: list[str | int] = [
                    admission_id,
                    max_tokens,
                    max_tokens,
                    key.tpm or 0,
                    0,
                    1,
                    1,
                    self._lease_ms,
                ]
                self._defer(_Settlement(admission_id, settle_keys, withdraw, deadline))
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
            settle_args: list[str | int] = [
                admission_id,
                max_tokens,
                actual_tokens,
                key.tpm or 0,
                units,
                tracked,
                0,
                self._lease_ms,
            ]
            try:
                await self._settle(keys=settle_keys, args=settle_args)
            except _UNREACHABLE as exc:
                logger.warning("settling admission %s deferred, Redis is unavailable: %s", admission_id, _describe(exc))
                self._defer(_Settlement(admission_id, settle_keys, settle_args, deadline))

        return Admission(headers, release)

    def _defer(self, settlement: _Settlement) -> None:
        if len(self._deferred) >= MAX_DEFERRED_SETTLEMENTS:
            dropped, _ = self._deferred.popitem(last=False)
            logger.error("settlement of admission %s dropped: too many wait for Redis", dropped)
        self._deferred[settlement.admission_id] = settlement
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.create_task(self._retry_deferred())

    async def _retry_deferred(self) -> None:
        """Hand deferred settlements to Redis, oldest first, pausing longer while it stays away."""
        loop = asyncio.get_running_loop()
        pause = RETRY_FIRST_PAUSE_S
        while self._deferred:
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_PAUSE_S)
            while self._deferred:
                admission_id, settlement = next(iter(self._deferred.items()))
                if settlement.deadline <= loop.time():
                    # Redis reads the spend again from the usage table when it finds the reservation lost.
                    logger.error("admission %s was not settled within its lease", admission_id)
                else:
                    try:
                        await self._settle(keys=settlement.keys, args=settlement.args)
                    except _UNREACHABLE:
                        break
                    pause = RETRY_FIRST_PAUSE_S
                self._deferred.pop(admission_id, None)

    async def _shared_seed(self, key: ApiKeyInfo, start: datetime | None, spend_key: str) -> None:
        seeding = self._seeding.get(spend_key)
        if seeding is None:
            seeding = asyncio.ensure_future(self._seed_within(SEED_TIMEOUT_S, key, start, spend_key))
            self._seeding[spend_key] = seeding
            seeding.add_done_callback(lambda done: self._seed_done(spend_key, done))
        await asyncio.shield(seeding)

    def _seed_done(self, spend_key: str, seeding: asyncio.Future[None]) -> None:
        if self._seeding.get(spend_key) is seeding:
            del self._seeding[spend_key]
        if not seeding.cancelled():
            seeding.exception()  # retrieved here: every admission may have given up on it

    async def _seed_within(self, seconds: float, key: ApiKeyInfo, start: datetime | None, spend_key: str) -> None:
        # Bounded itself: a load stuck on a hung database would be joined by every later admission.
        async with asyncio.timeout(seconds):
            await self._seed(key, start, spend_key)

    async def _seed(self, key: ApiKeyInfo, start: datetime | None, spend_key: str) -> None:
        spent = Decimal(0) if self._spend_loader is None else await self._spend_loader(key.id, start)
        ttl = self._spend_ttl(key)
        async with self._client.pipeline(transaction=True) as pipe:
            # HSETNX: when replicas seed together, the first one's value stands.
            pipe.hsetnx(spend_key, "base", to_units(spent))
            pipe.hdel(spend_key, "reloading")
            if ttl:
                pipe.expire(spend_key, ttl)
            await pipe.execute()

    def _keys(self, key_id: str, start: datetime | None) -> list[str]:
        base = f"{self._prefix}:{{{key_id}}}"
        period = "total" if start is None else start.strftime("%Y%m%d")
        names = ("rpm", "tpm", "inflight", "reserved", f"spend:{period}", "withdrawn")
        return [f"{base}:{name}" for name in names]

    @staticmethod
    def _spend_ttl(key: ApiKeyInfo) -> int:
        # A period's spend outlives the period by a day, for requests that straddle its end.
        return {"total": 0, "daily": 2 * 86400, "monthly": 32 * 86400}[key.budget_period]

    async def problem(self) -> str | None:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                await self._client.ping()
        except _UNREACHABLE as exc:
            return f"redis: {_describe(exc)}"
        return None

    async def aclose(self) -> None:
        """Stop retrying deferred settlements (their leases expire in Redis) and disconnect."""
        if self._retrier is not None:
            self._retrier.cancel()
            await asyncio.gather(self._retrier, return_exceptions=True)
        if self._deferred:
            logger.warning("%d settlements left for Redis to expire", len(self._deferred))
            self._deferred.clear()
        await self._client.aclose()


def _describe(exc: BaseException) -> str:
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {detail}".rstrip(": ")


def _unavailable() -> ApiError:
    return ApiError(
        503,
        "The rate limiter is unavailable; the request was not started. Please retry shortly.",
        type="server_error",
        code="limiter_unavailable",
        headers={"Retry-After": "1"},
    )
