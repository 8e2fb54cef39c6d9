"""Everything that accounts for requests, opened and closed together: the database, API keys,
the usage recorder and the limiter. ``serve`` opens it once; the request path uses its parts.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.accounting.fail_closed import failing_closed
from gateway.accounting.keys import KeyStore, NewKey
from gateway.accounting.limits import Limiter, MemoryLimiter, RedisLimiter
from gateway.accounting.usage import UsageRecorder, spend_since
from gateway.accounting.usage.spool import UsageSpool, spool_directory
from gateway.db import ensure_database_current, is_sqlite, make_engine, make_sessionmaker, upgrade_database
from gateway.settings import Settings


@dataclass(slots=True)
class Accounting:
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    keys: KeyStore
    usage: UsageRecorder
    limiter: Limiter

    async def aclose(self) -> None:
        """Commit every queued usage row, then let go of Redis and the database."""
        try:
            await self.usage.aclose()
        finally:
            try:
                await self.limiter.aclose()
            finally:
                await self.engine.dispose()


async def open_database(url: str) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    """Connect; the embedded SQLite file migrates itself, PostgreSQL must already be current.

    A shared PostgreSQL database is migrated by one deliberate ``llama-gateway db upgrade``, not by
    whichever replica starts first; one that is behind raises ``DatabaseBehind``.
    """
    if is_sqlite(url):
        await upgrade_database(url)
    engine = make_engine(url)
    try:
        await ensure_database_current(engine)
    except BaseException:
        await engine.dispose()
        raise
    return engine, make_sessionmaker(engine)


async def open_accounting(settings: Settings) -> Accounting:
    engine, sessionmaker = await open_database(settings.database_url)
    # A budget's spend is read from the usage table at a key's first admission in a period.
    spend_loader = failing_closed(partial(spend_since, sessionmaker), "loading a key's spend")
    limiter: Limiter = (
        RedisLimiter.from_url(settings.redis_url, spend_loader) if settings.redis_url else MemoryLimiter(spend_loader)
    )
    spool = UsageSpool(spool_directory(settings.data_path(), settings.database_url))
    usage = UsageRecorder(sessionmaker, flush_interval_s=settings.usage_flush_interval_ms / 1000, spool=spool)
    usage.start()
    return Accounting(
        engine=engine,
        sessionmaker=sessionmaker,
        keys=KeyStore(sessionmaker, cache_seconds=settings.key_cache_seconds),
        usage=usage,
        limiter=limiter,
    )


async def ensure_initial_admin_key(accounting: Accounting, preset: str | None = None) -> str | None:
    """On first run (no key at all) create an admin key.

    Returns the generated plaintext, to be shown once. Returns None when keys exist already, or
    when the operator preset the key (setting ``initial_admin_key``, env
    ``LLAMA_GATEWAY_INITIAL_ADMIN_KEY``): they know it, and it should not reach the logs.
    """
    created = await accounting.keys.create_first(
        NewKey(name="initial admin", scope="admin", metadata={"created_by": "first run"}),
        plaintext=preset or None,
    )
    if created is None or preset:
        return None
    return created[1]


def initial_key_notice(plaintext: str, base_url: str, model: str) -> str:
    """What ``serve`` prints once when it created the first admin key."""
    body = shlex.quote(f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}')
    return (
        "No API key existed, so an admin key was created. It is shown only this once; store it now:\n\n"
        f"    {plaintext}\n\n"
        "Try it:\n\n"
        f"    curl {base_url.rstrip('/')}/v1/chat/completions \\\n"
        f'      -H "Authorization: Bearer {plaintext}" \\\n'
        '      -H "Content-Type: application/json" \\\n'
        f"      -d {body}\n\n"
        "Create keys for your users with `llama-gateway keys create --name NAME`.\n"
    )
