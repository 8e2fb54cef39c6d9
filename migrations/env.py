"""Alembic environment: one history for SQLite (aiosqlite) and PostgreSQL (asyncpg).

``gateway.db.upgrade_database`` hands in an open connection through ``config.attributes``; the
``alembic`` command line (developers writing a revision) connects with ``sqlalchemy.url``, or with
``LLAMA_GATEWAY_DATABASE_URL`` when the ini file leaves it out.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from gateway.db.engine import async_url, make_engine
from gateway.db.tables import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table the same way on both databases.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_configure)
    finally:
        await engine.dispose()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("LLAMA_GATEWAY_DATABASE_URL")
    if not url:
        raise RuntimeError("set sqlalchemy.url in alembic.ini or LLAMA_GATEWAY_DATABASE_URL")
    return async_url(url)


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    _configure(shared)
else:
    asyncio.run(_run_with_own_engine(_url()))
