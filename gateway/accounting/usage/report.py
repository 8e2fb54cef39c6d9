"""Usage reports: requests, tokens and USD per key, model, status, UTC day or UTC hour, with totals.

Used by ``llama-gateway usage report``, the admin API and ``GET /v1/usage``. ``since`` is inclusive
and ``until`` exclusive, both on the request's start time. With a ``bucket`` (hour or day) each
group is split further by the time its requests started in: the series a chart draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.usage.groupings import (
    Bucket,
    GroupBy,
    group_columns,
    needs_key_join,
    time_bucket,
    usage_filters,
)
from gateway.db.column_types import MONEY_QUANTUM
from gateway.db.tables import ApiKey, UsageRecord

ZERO = Decimal("0E-10")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    group: str
    """The key id, model name, status, day (YYYY-MM-DD) or hour (YYYY-MM-DDTHH:00Z); "total" for
    the report's total."""
    label: str | None
    """The key's name when grouped by key."""
    requests: int
    prompt_tokens: int
    completion_tokens: int
    input_cost: Decimal
    output_cost: Decimal
    bucket: str | None = None
    """The UTC day or hour of a bucketed report's row; None otherwise and on the total."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total_cost(self) -> Decimal:
        return self.input_cost + self.output_cost

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; amounts as strings so that no consumer reads them as floats."""
        return {
            **({"bucket": self.bucket} if self.bucket is not None else {}),
            "group": self.group,
            "label": self.label,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "input_cost_usd": fixed_usd(self.input_cost),
            "output_cost_usd": fixed_usd(self.output_cost),
            "total_cost_usd": fixed_usd(self.total_cost),
        }


def fixed_usd(amount: Decimal) -> str:
    """Plain digits at the stored precision: str(Decimal) writes small amounts as "1.95E-7"."""
    return f"{amount.quantize(MONEY_QUANTUM):f}"


@dataclass(frozen=True, slots=True)
class UsageReport:
    group_by: GroupBy
    rows: list[UsageTotals]
    total: UsageTotals
    bucket: Bucket | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "group_by": self.group_by,
            **({"bucket": self.bucket} if self.bucket is not None else {}),
            "rows": [row.as_dict() for row in self.rows],
            "total": self.total.as_dict(),
        }


async def usage_report(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    group_by: GroupBy = "key",
    bucket: Bucket | None = None,
    key_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> UsageReport:
    async with sessionmaker() as session:
        dialect = (await session.connection()).dialect.name
        group, label = group_columns(group_by, dialect)
        keys: list[ColumnElement[str]] = [group, label] if needs_key_join(group_by) else [group]
        if bucket is not None:
            keys.insert(0, time_bucket(bucket, dialect))
        query = select(
            *keys,
            func.count().label("requests"),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.input_cost),
            func.sum(UsageRecord.output_cost),
        ).select_from(UsageRecord)
        if needs_key_join(group_by):
            query = query.join(ApiKey, ApiKey.id == UsageRecord.key_id)
        query = query.where(*usage_filters(key_id, model, since, until)).group_by(*keys).order_by(*keys)
        result = await session.execute(query)
        rows = [_totals(row, bucketed=bucket is not None, labelled=needs_key_join(group_by)) for row in result.all()]
    return UsageReport(group_by, rows, sum_totals(rows), bucket)


def _totals(row: Any, *, bucketed: bool, labelled: bool) -> UsageTotals:
    values = list(row)
    bucket = str(values.pop(0)) if bucketed else None
    group = str(values.pop(0))
    label = values.pop(0) if labelled else None
    requests, prompt_tokens, completion_tokens, input_cost, output_cost = values
    return UsageTotals(
        group=group,
        label=label,
        requests=int(requests),
        prompt_tokens=int(prompt_tokens or 0),
        completion_tokens=int(completion_tokens or 0),
        input_cost=input_cost or ZERO,
        output_cost=output_cost or ZERO,
        bucket=bucket,
    )


def sum_totals(rows: list[UsageTotals]) -> UsageTotals:
    """The total row. Summed here, not in SQL: Decimal addition is exact, and the total must equal its rows."""
    return UsageTotals(
        "total",
        None,
        sum(r.requests for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.completion_tokens for r in rows),
        sum((r.input_cost for r in rows), ZERO),
        sum((r.output_cost for r in rows), ZERO),
    )


async def spend_since(sessionmaker: async_sessionmaker[AsyncSession], key_id: str, since: datetime | None) -> Decimal:
    """What a key has spent since ``since`` (ever, if None): seeds the limiter's budget tracking."""
    return (await spend_by_key(sessionmaker, [key_id], since)).get(key_id, ZERO)


async def spend_by_key(
    sessionmaker: async_sessionmaker[AsyncSession], key_ids: list[str], since: datetime | None
) -> dict[str, Decimal]:
    """What each of ``key_ids`` has spent since ``since`` (ever, if None); keys without usage are absent."""
    if not key_ids:
        return {}
    query = (
        select(UsageRecord.key_id, func.sum(UsageRecord.input_cost), func.sum(UsageRecord.output_cost))
        .where(UsageRecord.key_id.in_(key_ids), *usage_filters(None, None, since, None))
        .group_by(UsageRecord.key_id)
    )
    async with sessionmaker() as session:
        result = await session.execute(query)
        return {key_id: (spent_in or ZERO) + (spent_out or ZERO) for key_id, spent_in, spent_out in result.all()}
