"""Engines, sessions and migrations for SQLite (embedded) and PostgreSQL (production).

Errors raised here::

    DatabaseNotReady            the schema does not match this release; the gateway must not start
    ├── DatabaseBehind          migrations are pending: run ``llama-gateway db upgrade``
    └── DatabaseAhead           a newer release migrated the database past what this one knows
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}
# Any constant works; it only has to be the same for every replica running ``db upgrade``.
_MIGRATION_LOCK_ID = 0x6C6C616D61
SQLITE_BUSY_TIMEOUT_S = 10.0


class DatabaseNotReady(Exception):
    """The database schema does not match this release of llama-gateway."""

    def __init__(self, message: str, *, current: str | None, head: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


class DatabaseBehind(DatabaseNotReady):
    """Migrations are pending."""


class DatabaseAhead(DatabaseNotReady):
    """The database carries a revision this release does not know."""


def async_url(url: str) -> str:
    """The URL with its async driver: ``postgresql://`` becomes ``postgresql+asyncpg://``."""
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def safe_url(url: str) -> str:
    """The URL for messages and logs: the password masked."""
    return make_url(url).render_as_string(hide_password=True)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **options: Any) -> AsyncEngine:
    url = async_url(url)
    # Statement parameters hold key hashes and callers' values: a database error, and so a log
    # line, must not repeat them.
    options.setdefault("hide_parameters", True)
    if is_sqlite(url):
        engine = create_async_engine(url, **options)
        event.listen(engine.sync_engine, "connect", lambda connection, _: configure_sqlite(connection))
        return engine
    options.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **options)


def configure_sqlite(dbapi_connection: Any, *, busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (key lookups, reports) run while the usage writer commits.
    cursor.execute("PRAGMA journal_mode=WAL")
    # Writers from other connections wait for the lock instead of failing with "database is locked".
    cursor.execute(f"PRAGMA busy_timeout={max(1, round(busy_timeout_s * 1000)):d}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Objects outlive their session as read-only snapshots; reloading them after commit is wasted I/O.
    return async_sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """Where the Alembic scripts are: ``migrations/`` beside the ``gateway`` package."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"no Alembic migrations found beside {package}")


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        # Config values go through configparser interpolation, where "%" is special.
        config.set_main_option("sqlalchemy.url", async_url(url).replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("the migration history is empty")
    return head


async def upgrade_database(url: str, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` (an empty database gets every table)."""
    engine = make_engine(url)
    config = alembic_config(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, config, revision)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, config: Config, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Several replicas may run ``db upgrade`` at once (init containers); one migrates, the rest wait.
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def database_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def pending_migrations(engine: AsyncEngine) -> bool:
    return await database_revision(engine) != head_revision()


async def ensure_database_current(engine: AsyncEngine) -> None:
    """Raise ``DatabaseBehind`` or ``DatabaseAhead`` unless the schema is exactly at the head."""
    current = await database_revision(engine)
    head = head_revision()
    if current == head:
        return
    where = safe_url(engine.url.render_as_string(hide_password=False))
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseAhead(
            f"The database at {where} is at migration {current}, which this release of llama-gateway "
            f"does not know (its newest is {head}): a newer release has migrated it. Run that release.",
            current=current,
            head=head,
        )
    state = "has no tables yet" if current is None else f"is at migration {current}"
    raise DatabaseBehind(
        f"The database at {where} {state}, but this release of llama-gateway needs migration {head}. "
        "Run `llama-gateway db upgrade` with the same --config / LLAMA_GATEWAY_DATABASE_URL, "
        "then start again.",
        current=current,
        head=head,
    )
