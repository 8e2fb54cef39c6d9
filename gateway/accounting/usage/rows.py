"""The one statement the recorder runs: insert a batch of usage rows, exactly once each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounting.usage.entry import UsageEntry
from gateway.db.tables import UsageRecord

_table = cast(Table, UsageRecord.__table__)
# Columns that tell "this row is ours, from an earlier try" from "another request took this id".
_IDENTITY = ("key_id", "model", "prompt_tokens", "completion_tokens", "started_at")


async def insert_entries(
    sessionmaker: async_sessionmaker[AsyncSession], entries: Sequence[UsageEntry]
) -> dict[str, str]:
    """Insert the rows in one statement; return the request ids refused, with the reason.

    A COMMIT whose reply was lost may have succeeded, and the retry then meets its own rows:
    ``ON CONFLICT DO NOTHING`` keeps that retry from failing the batch, and comparing the rows
    that were already there tells a retry apart from a request id used twice.
    """
    engine: AsyncEngine = sessionmaker.kw["bind"]
    # One INSERT is atomic on its own: in autocommit mode it is committed when it returns, with
    # one round trip instead of BEGIN, INSERT, COMMIT.
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        insert = postgresql.insert if autocommit.dialect.name == "postgresql" else sqlite.insert
        statement = insert(_table).on_conflict_do_nothing(index_elements=["request_id"]).returning(_table.c.request_id)
        result = await autocommit.execute(statement, [entry.row() for entry in entries])
        inserted = set(result.scalars().all())
        already = {entry.request_id: entry for entry in entries if entry.request_id not in inserted}
        if not already:
            return {}
        columns = [_table.c.request_id, *(_table.c[name] for name in _IDENTITY)]
        stored = await autocommit.execute(select(*columns).where(_table.c.request_id.in_(already)))
        refused: dict[str, str] = {}
        for request_id, *values in stored.all():
            entry = already[request_id]
            if tuple(values) != tuple(getattr(entry, name) for name in _IDENTITY):
                refused[request_id] = f"request id {request_id!r} already has a different usage row"
        return refused
