"""Persistence: the tables, engines for SQLite and PostgreSQL, and their migrations."""

from gateway.db.engine import (
    DatabaseAhead,
    DatabaseBehind,
    DatabaseNotReady,
    async_url,
    database_revision,
    ensure_database_current,
    head_revision,
    is_sqlite,
    make_engine,
    make_sessionmaker,
    pending_migrations,
    safe_url,
    upgrade_database,
)
from gateway.db.tables import ApiKey, Base, UsageRecord

__all__ = [
    "ApiKey",
    "Base",
    "DatabaseAhead",
    "DatabaseBehind",
    "DatabaseNotReady",
    "UsageRecord",
    "async_url",
    "database_revision",
    "ensure_database_current",
    "head_revision",
    "is_sqlite",
    "make_engine",
    "make_sessionmaker",
    "pending_migrations",
    "safe_url",
    "upgrade_database",
]
