"""Where each key stands against its budget: spent in the current period, and what is left.

The period is the limiter's (``gateway.accounting.limits.period_start``: the UTC day, the UTC month,
or all time), and the spend is what the usage rows hold: committed requests, not the worst-case
holds of requests still running, so the limiter may refuse a request slightly before ``remaining``
reaches zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.keys import ApiKeyInfo, key_fields
from gateway.accounting.limits.base import period_start
from gateway.accounting.usage.report import ZERO, fixed_usd, spend_by_key


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    key: ApiKeyInfo
    period_start: datetime | None
    """None: the budget counts all time (or the key has no budget and this is its total spend)."""
    spent: Decimal

    @property
    def remaining(self) -> Decimal | None:
        """What is left of the budget, never below zero; None without a budget."""
        if self.key.budget_usd is None:
            return None
        return max(self.key.budget_usd - self.spent, ZERO)

    def as_dict(self) -> dict[str, Any]:
        remaining = self.remaining
        return {
            "object": "key_budget",
            "key": key_fields(self.key),
            "period_start": None if self.period_start is None else self.period_start.isoformat(),
            "spent_usd": fixed_usd(self.spent),
            "remaining_usd": None if remaining is None else fixed_usd(remaining),
        }


async def budget_statuses(
    sessionmaker: async_sessionmaker[AsyncSession], keys: Sequence[ApiKeyInfo], now: datetime
) -> list[BudgetStatus]:
    """Each key's spend in its current budget period, in the order given: one query per kind of period."""
    by_start: defaultdict[datetime | None, list[str]] = defaultdict(list)
    starts = {key.id: period_start(key.budget_period, now) for key in keys}
    for key in keys:
        by_start[starts[key.id]].append(key.id)
    spent: dict[str, Decimal] = {}
    for start, key_ids in by_start.items():
        spent |= await spend_by_key(sessionmaker, key_ids, start)
    return [BudgetStatus(key, starts[key.id], spent.get(key.id, ZERO)) for key in keys]
