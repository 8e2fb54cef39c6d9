"""Limits kept in this process: right for one replica, needs no Redis.

Checks and reservations for one admission run with no ``await`` between them, so they are
atomic on the event loop without a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

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


@dataclass(slots=True)
class _Bucket:
    """Holds up to ``limit`` and refills at ``limit`` per minute; a missing bucket is a full one."""

    level: float
    updated: float

    def refill(self, limit: int, now: float) -> float:
        self.level = min(float(limit), self.level + (now - self.updated) * limit / 60)
        self.updated = now
        return self.level


@dataclass(slots=True)
class _Spend:
    period: datetime | None
    settled: Decimal
    reserved: Decimal = Decimal(0)


@dataclass(slots=True)
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0
    spend: _Spend | None = None
    seeding: dict[datetime | None, asyncio.Task[Decimal]] = field(default_factory=dict)


def _bucket(current: _Bucket | None, limit: int, now: float) -> _Bucket:
    bucket = current or _Bucket(float(limit), now)
    bucket.refill(limit, now)
    return bucket


class MemoryLimiter:
    def __init__(
        self,
        spend_loader: SpendLoader | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._spend_loader = spend_loader
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys: dict[str, _KeyState] = {}

    async def admit(self, key: ApiKeyInfo, *, max_tokens: int, worst_case_cost: Decimal) -> Admission:
        if not key.has_limits:
            return Admission()
        state = self._keys.setdefault(key.id, _KeyState())
        spend = await self._spend(key, state) if key.budget_usd is not None else None
        # From here on no await: the checks and the reservations below are one atomic step.
        now = self._clock()
        requests = _bucket(state.requests, key.rpm, now) if key.rpm is not None else None
        tokens = _bucket(state.tokens, key.tpm, now) if key.tpm is not None else None
        left_requests = requests.level if requests else 0.0
        left_tokens = tokens.level if tokens else 0.0
        headers = rate_headers(key.rpm, left_requests, key.tpm, left_tokens)
        if requests is not None and key.rpm is not None and requests.level < 1:
            raise requests_exceeded(key, (1 - requests.level) * 60 / key.rpm, headers)
        if tokens is not None and key.tpm is not None and (max_tokens > key.tpm or tokens.level < max_tokens):
            raise tokens_exceeded(key, max_tokens, (max_tokens - tokens.level) * 60 / key.tpm, headers)
        if key.max_concurrency is not None and state.in_flight >= key.max_concurrency:
            raise concurrency_exceeded(key)
        if spend is not None and key.budget_usd is not None:
            if spend.settled + worst_case_cost > key.budget_usd:
                raise budget_exhausted(key)
            if spend.settled + spend.reserved + worst_case_cost > key.budget_usd:
                raise budget_held(key)
            spend.reserved += worst_case_cost
        if requests is not None:
            requests.level -= 1
            state.requests = requests
        if tokens is not None:
            tokens.level -= max_tokens
            state.tokens = tokens
        state.in_flight += 1

        async def release(actual_tokens: int, actual_cost: Decimal) -> None:
            state.in_flight -= 1
            if tokens is not None and key.tpm is not None:
                tokens.refill(key.tpm, self._clock())
                tokens.level = min(float(key.tpm), tokens.level + max_tokens - actual_tokens)
            if spend is not None:
                spend.reserved -= worst_case_cost
                spend.settled += actual_cost

        return Admission(rate_headers(key.rpm, left_requests - 1, key.tpm, left_tokens - max_tokens), release)

    async def _spend(self, key: ApiKeyInfo, state: _KeyState) -> _Spend:
        start = period_start(key.budget_period, self._wall_clock())
        if state.spend is not None and state.spend.period == start:
            return state.spend
        # Concurrent first requests share one load of the period's spend from the database.
        task = state.seeding.get(start)
        if task is None:
            task = asyncio.ensure_future(self._load(key.id, start))
            state.seeding[start] = task
        try:
            settled = await asyncio.shield(task)
        finally:
            if task.done():
                state.seeding.pop(start, None)
        if state.spend is None or state.spend.period != start:
            state.spend = _Spend(start, settled)
        return state.spend

    async def _load(self, key_id: str, start: datetime | None) -> Decimal:
        return Decimal(0) if self._spend_loader is None else await self._spend_loader(key_id, start)

    async def problem(self) -> str | None:
        return None  # in-process state is always there

    async def aclose(self) -> None:
        self._keys.clear()
