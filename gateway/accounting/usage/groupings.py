"""How usage rows are grouped and filtered, as SQL expressions that SQLite and PostgreSQL answer alike.

Time groups are UTC: a day is ``YYYY-MM-DD`` and an hour ``YYYY-MM-DDTHH:00Z``, both ISO 8601 and
ordered as text the way they are ordered in time, so that reports sort them in SQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from sqlalchemy import ColumnElement, String, cast, func, null

from gateway.db.tables import ApiKey, UsageRecord

GroupBy = Literal["key", "model", "day", "hour", "status"]
Bucket = Literal["hour", "day"]
GROUPINGS: tuple[str, ...] = get_args(GroupBy)
BUCKETS: tuple[str, ...] = get_args(Bucket)

# strftime (SQLite) and to_char (PostgreSQL) patterns writing the same text.
_SQLITE_FORMATS = {"day": "%Y-%m-%d", "hour": "%Y-%m-%dT%H:00Z"}
_POSTGRES_FORMATS = {"day": "YYYY-MM-DD", "hour": 'YYYY-MM-DD"T"HH24:00"Z"'}


def time_bucket(bucket: Bucket, dialect: str) -> ColumnElement[str]:
    """The UTC day or hour a request started in, as text."""
    started = UsageRecord.started_at
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", started), _POSTGRES_FORMATS[bucket])
    # SQLite holds UTC timestamps as text (see gateway.db.column_types.UtcDateTime).
    return func.strftime(_SQLITE_FORMATS[bucket], started)


def group_columns(group_by: GroupBy, dialect: str) -> tuple[ColumnElement[str], ColumnElement[str]]:
    """The group's value and its label (a key's name when grouped by key, NULL otherwise).

    Grouping by key needs ``ApiKey`` joined on ``UsageRecord.key_id`` (see ``needs_key_join``).
    """
    no_label: ColumnElement[str] = cast(null(), String)
    if group_by == "key":
        return UsageRecord.key_id.expression, ApiKey.name.expression
    if group_by == "model":
        return UsageRecord.model.expression, no_label
    if group_by == "status":
        return UsageRecord.status.expression, no_label
    return time_bucket(group_by, dialect), no_label


def needs_key_join(group_by: GroupBy) -> bool:
    return group_by == "key"


def usage_filters(
    key_id: str | None, model: str | None, since: datetime | None, until: datetime | None
) -> list[ColumnElement[bool]]:
    """``since`` is inclusive and ``until`` exclusive, both on the request's start time."""
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
