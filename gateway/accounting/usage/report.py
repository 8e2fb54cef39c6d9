"""Usage reports: requests, tokens and USD per key, model or day, with totals.

Used by ``llama-gateway usage report``, the admin API and ``GET /v1/usage``. Days are UTC days.
``since`` is inclusive and ``until`` exclusive, both on the request's start time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import ColumnElement, String, cast, func, null, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.db.column_types import MONEY_QUANTUM
from gateway.db.tables import ApiKey, UsageRecord

GroupBy = Literal["key", "model", "day"]
ZERO = Decimal("0E-10")


@dataclass(frozen=True, slots=True)
class UsageTotals:
    group: str
    """The key id, model name, or day (YYYY-MM-DD); "total" for the report's total."""
    label: str | None
    """The key's name when grouped by key."""
    requests: int
    prompt_tokens: int
    completion_tokens: int
    input_cost: Decimal
    output_cost: Decimal

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def total_cost(self) -> Decimal:
        return self.input_cost + self.output_cost

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; amounts as strings so that no consumer reads them as floats."""
        return {
            "group": self.group,
            "label": self.label,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "input_cost_usd": _fixed(self.input_cost),
            "output_cost_usd": _fixed(self.output_cost),
            "total_cost_usd": _fixed(self.total_cost),
        }


def _fixed(amount: Decimal) -> str:
    # Plain digits at the stored precision: str(Decimal) writes small amounts as "1.95E-7".
    return f"{amount.quantize(MONEY_QUANTUM):f}"


@dataclass(frozen=True, slots=True)
class UsageReport:
    group_by: GroupBy
    rows: list[UsageTotals]
    total: UsageTotals

    def as_dict(self) -> dict[str, Any]:
        return {
            "group_by": self.group_by,
            "rows": [row.as_dict() for row in self.rows],
            "total": self.total.as_dict(),
        }


def _day(dialect: str) -> ColumnElement[str]:
    started = UsageRecord.started_at
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", started), "YYYY-MM-DD")
    # SQLite holds UTC timestamps as text (see gateway.db.column_types.UtcDateTime).
    return func.strftime("%Y-%m-%d", started)


def _where(
    key_id: str | None, model: str | None, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if key_id is not None:
        conditions.append(UsageRecord.key_id == key_id)
    if model is not None:
        conditions.append(UsageRecord.model == model)
    if since is not None:
        conditions.append(UsageRecord.started_at >= since)
    if until is not None:
        conditions.append(UsageRecord.started_at < until)
    return conditions


async def usage_report(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    group_by: GroupBy = "key",
    key_id: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> UsageReport:
    async with sessionmaker() as session:
        dialect = (await session.connection()).dialect.name
        group: ColumnElement[str]
        label: ColumnElement[str] = cast(null(), String)  # NULL unless grouped by key
        if group_by == "key":
            group, label = UsageRecord.key_id.expression, ApiKey.name.expression
        elif group_by == "model":
            group = UsageRecord.model.expression
        else:
            group = _day(dialect)
        query = select(
            group.label("group"),
            label.label("label"),
            func.count().label("requests"),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.input_cost),
            func.sum(UsageRecord.output_cost),
        ).select_from(UsageRecord)
        if group_by == "key":
            query = query.join(ApiKey, ApiKey.id == UsageRecord.key_id).group_by(group, label)
        else:
            query = query.group_by(group)
        result = await session.execute(query.where(*_where(key_id, model, since, until)).order_by(group))
        rows = [
            UsageTotals(
                group=str(row[0]),
                label=row[1],
                requests=int(row[2]),
                prompt_tokens=int(row[3] or 0),
                completion_tokens=int(row[4] or 0),
                input_cost=row[5] or ZERO,
                output_cost=row[6] or ZERO,
            )
            for row in result.all()
        ]
    # Summed here, not in SQL: Decimal addition is exact, and the total must equal its rows.
    total = UsageTotals(
        "total",
        None,
        sum(r.requests for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.completion_tokens for r in rows),
        sum((r.input_cost for r in rows), ZERO),
        sum((r.output_cost for r in rows), ZERO),
    )
    return UsageReport(group_by, rows, total)


async def spend_since(sessionmaker: async_sessionmaker[AsyncSession], key_id: str, since: datetime | None) -> Decimal:
    """What a key has spent since ``since`` (ever, if None): seeds the limiter's budget tracking."""
    query = select(func.sum(UsageRecord.input_cost), func.sum(UsageRecord.output_cost)).where(
        *_where(key_id, None, since, None)
    )
    async with sessionmaker() as session:
        spent_in, spent_out = (await session.execute(query)).one()
    return (spent_in or ZERO) + (spent_out or ZERO)
