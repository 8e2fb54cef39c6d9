"""Column types that behave the same on SQLite and PostgreSQL.

SQLite has no decimal type: a ``NUMERIC`` column there stores a float, so money would drift.
``Money`` keeps ``NUMERIC(20, 10)`` on PostgreSQL and stores an integer count of 1e-10 USD on
SQLite (exact, and ``SUM`` stays exact up to about 920 million USD). ``UtcDateTime`` always hands
back timezone-aware UTC datetimes, which SQLite cannot store.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Numeric
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

MONEY_SCALE = 10
MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_SCALE)


class Money(TypeDecorator[Decimal]):
    """USD amounts with ten decimal places, exact on every backend."""

    impl = Numeric(20, MONEY_SCALE)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(BigInteger())
        return dialect.type_descriptor(Numeric(20, MONEY_SCALE, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Decimal | int | None:
        if value is None:
            return None
        amount = Decimal(value)
        exact = amount.quantize(MONEY_QUANTUM)
        if exact != amount:
            # Silent rounding would make stored money differ from what was computed.
            raise ValueError(f"{amount} has more than {MONEY_SCALE} decimal places")
        if dialect.name == "sqlite":
            return int(exact.scaleb(MONEY_SCALE))
        return exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-MONEY_SCALE).quantize(MONEY_QUANTUM)
        return Decimal(value).quantize(MONEY_QUANTUM)


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and returned timezone-aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous: pass a timezone-aware datetime")
        value = value.astimezone(UTC)
        # SQLite keeps the text form; one fixed zone keeps its string order equal to time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
