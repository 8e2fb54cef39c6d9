"""Latency percentiles from the usage rows: time to first token and request duration per group.

Every usage row keeps its request's ``ttft_ms`` (None when no token came) and ``duration_ms``.
Percentiles are nearest-rank over those values (p50, p90, p99: the smallest recorded value that at
least that share of the group's requests did not exceed), so each one is a latency some request
really had, exact to the millisecond, and the same on SQLite and PostgreSQL (SQLite has no
``percentile_cont``). Rows of every status count; a request without a first token counts for
duration only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.usage.groupings import GroupBy, group_columns, needs_key_join, usage_filters
from gateway.db.tables import ApiKey, UsageRecord

PERCENTILES = (50, 90, 99)


def nearest_rank(ordered: Sequence[int], percentile: int) -> int | None:
    """The nearest-rank percentile of values sorted ascending; None for no values."""
    if not ordered:
        return None
    rank = -(-percentile * len(ordered) // 100)  # ceil(p/100 * n) in integers
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int
    """How many requests had a value."""
    values: dict[int, int | None]
    """Milliseconds by percentile (50, 90, 99); None when no request had a value."""

    @classmethod
    def of(cls, values: list[int]) -> Percentiles:
        ordered = sorted(values)
        return cls(len(ordered), {p: nearest_rank(ordered, p) for p in PERCENTILES})

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, **{f"p{p}_ms": value for p, value in self.values.items()}}


@dataclass(frozen=True, slots=True)
class LatencyGroup:
    group: str
    label: str | None
    requests: int
    ttft: Percentiles
    duration: Percentiles

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "label": self.label,
            "requests": self.requests,
            "ttft": self.ttft.as_dict(),
            "duration": self.duration.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class LatencyReport:
    group_by: GroupBy
    rows: list[LatencyGroup]
    total: LatencyGroup


class _Samples:
    def __init__(self) -> None:
        self.label: str | None = None
        self.requests = 0
        self.ttft: list[int] = []
        self.duration: list[int] = []

    def add(self, ttft_ms: int | None, duration_ms: int) -> None:
        self.requests += 1
        if ttft_ms is not None:
            self.ttft.append(ttft_ms)
        self.duration.append(duration_ms)

    def summary(self, group: str) -> LatencyGroup:
        return LatencyGroup(group, self.label, self.requests, Percentiles.of(self.ttft), Percentiles.of(self.duration))


async def latency_report(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    group_by: GroupBy = "model",
    key_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> LatencyReport:
    """Percentiles per group (ordered like usage reports) and over every matching request."""
    groups: defaultdict[str, _Samples] = defaultdict(_Samples)
    everything = _Samples()
    async with sessionmaker() as session:
        dialect = (await session.connection()).dialect.name
        group, label = group_columns(group_by, dialect)
        query = select(group, label, UsageRecord.ttft_ms, UsageRecord.duration_ms).select_from(UsageRecord)
        if needs_key_join(group_by):
            query = query.join(ApiKey, ApiKey.id == UsageRecord.key_id)
        query = query.where(*usage_filters(key_id, model, since, until)).order_by(group)
        # Streamed: only two integers per request are kept, never whole rows.
        async for value, name, ttft_ms, duration_ms in await session.stream(query):
            samples = groups[str(value)]
            samples.label = name
            samples.add(ttft_ms, duration_ms)
            everything.add(ttft_ms, duration_ms)
    rows = [samples.summary(value) for value, samples in groups.items()]
    return LatencyReport(group_by, rows, everything.summary("total"))
