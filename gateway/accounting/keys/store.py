"""The key store: create, change, revoke and authenticate API keys.

``authenticate`` runs on every request, so its answers are cached for ``cache_seconds`` (positive
and negative alike). That bounds how long a revoked key keeps working on a replica that did not
revoke it; the replica that revokes forgets its cached answer at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.fail_closed import DATABASE_WAIT_S, needing_database
from gateway.accounting.keys.records import (
    KEY_PREFIX,
    ApiKeyInfo,
    BudgetPeriod,
    KeyNotFound,
    KeyUpdate,
    NewKey,
    Scope,
    check_preset_key,
    display_prefix,
    generate_key,
    hash_key,
    validated,
)
from gateway.db.tables import ApiKey

# Bounds the memory a flood of made-up keys can take; every one of them still costs a lookup.
MAX_CACHED_KEYS = 10_000
# Any constant: serialises "create the first admin key" between replicas starting together.
_FIRST_KEY_LOCK_ID = 0x6B657973


@dataclass(slots=True)
class _Cached:
    until: float
    info: ApiKeyInfo | None


def _could_be_id(key_id: str) -> bool:
    """False for a string no key id can be, which PostgreSQL would refuse as a parameter (NUL)."""
    return "\x00" not in key_id


def _now() -> datetime:
    return datetime.now(UTC)


def _snapshot(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=row.id,
        name=row.name,
        owner=row.owner,
        metadata=dict(row.metadata_),
        scope=cast(Scope, row.scope),
        prefix=row.prefix,
        allowed_models=None if row.allowed_models is None else tuple(row.allowed_models),
        rpm=row.rpm,
        tpm=row.tpm,
        max_concurrency=row.max_concurrency,
        budget_usd=row.budget_usd,
        # CHECK constraints hold both columns to their Literal values.
        budget_period=cast(BudgetPeriod, row.budget_period),
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
    )


class KeyStore:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        cache_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._cache_seconds = cache_seconds
        # A key created on another replica is refused for at most this long after a failed try.
        self._negative_seconds = min(cache_seconds, 1.0)
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        # Lookups under way, by digest: a burst of requests with a key not in the cache (a new key,
        # a replica just started) costs the database one query, not one per request.
        self._lookups: dict[str, asyncio.Future[ApiKeyInfo | None]] = {}
        # Counts changes made here, so that a lookup that began before one is not cached after it.
        self._changes = 0

    async def create(self, new: NewKey, *, plaintext: str | None = None) -> tuple[ApiKeyInfo, str]:
        """Store a new key; the plaintext is returned here and never again."""
        new, plaintext = self._prepare(new, plaintext)
        async with self._sessionmaker.begin() as session:
            row = self._add(session, new, plaintext)
        return _snapshot(row), plaintext

    async def create_first(self, new: NewKey, *, plaintext: str | None = None) -> tuple[ApiKeyInfo, str] | None:
        """Create the key only if no key exists yet (one winner among replicas starting together)."""
        new, plaintext = self._prepare(new, plaintext)
        async with self._sessionmaker.begin() as session:
            if (await session.connection()).dialect.name == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _FIRST_KEY_LOCK_ID})
            else:
                # Take SQLite's write lock before counting (several worker processes may share the file).
                await session.execute(text("BEGIN IMMEDIATE"))
            if await self._count(session):
                return None
            row = self._add(session, new, plaintext)
        return _snapshot(row), plaintext

    @staticmethod
    def _prepare(new: NewKey, plaintext: str | None) -> tuple[NewKey, str]:
        if plaintext is None:
            return validated(new), generate_key()
        check_preset_key(plaintext)
        return validated(new), plaintext

    def _add(self, session: AsyncSession, new: NewKey, plaintext: str) -> ApiKey:
        row = ApiKey(
            id=str(uuid.uuid4()),
            name=new.name,
            owner=new.owner,
            metadata_=new.metadata,
            scope=new.scope,
            key_hash=hash_key(plaintext),
            prefix=display_prefix(plaintext),
            allowed_models=new.allowed_models,
            rpm=new.rpm,
            tpm=new.tpm,
            max_concurrency=new.max_concurrency,
            budget_usd=new.budget_usd,
            budget_period=new.budget_period,
            expires_at=new.expires_at,
            created_at=_now(),
        )
        session.add(row)
        # A lookup of this key just before it existed may have been cached as "unknown".
        self._forget(row.key_hash)
        return row

    async def list(self, *, include_revoked: bool = True) -> list[ApiKeyInfo]:
        query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        async with self._sessionmaker() as session:
            return [_snapshot(row) for row in (await session.scalars(query)).all()]

    async def get(self, key_id: str) -> ApiKeyInfo | None:
        if not _could_be_id(key_id):
            return None
        async with self._sessionmaker() as session:
            row = await session.get(ApiKey, key_id)
            return None if row is None else _snapshot(row)

    async def count(self) -> int:
        async with self._sessionmaker() as session:
            return await self._count(session)

    async def update(self, key_id: str, update: KeyUpdate) -> ApiKeyInfo:
        changes = validated(update).changes()
        if "metadata" in changes:
            changes["metadata_"] = changes.pop("metadata")
        async with self._sessionmaker.begin() as session:
            row = await self._row_for_update(session, key_id)
            for field, value in changes.items():
                setattr(row, field, value)
        self._forget(row.key_hash)
        return _snapshot(row)

    async def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke the key (again revoking keeps the first time); it stops working within the cache TTL."""
        async with self._sessionmaker.begin() as session:
            row = await self._row_for_update(session, key_id)
            if row.revoked_at is None:
                row.revoked_at = _now()
        self._forget(row.key_hash)
        return _snapshot(row)

    async def authenticate(self, plaintext: str) -> ApiKeyInfo | None:
        """The key's snapshot if it exists, is not revoked and has not expired; else None."""
        if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 256:
            return None
        digest = hash_key(plaintext)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now:
            info = cached.info
        else:
            changes = self._changes
            async with needing_database("authenticating a key"):
                info = await self._shared_lookup(digest)
            if changes == self._changes:
                ttl = self._cache_seconds if info is not None else self._negative_seconds
                self._remember(digest, _Cached(now + ttl, info), now)
        # Checked on every call: a cached key may expire while it sits in the cache.
        return info if info is not None and info.is_usable(_now()) else None

    async def _shared_lookup(self, digest: str) -> ApiKeyInfo | None:
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self._lookup_within(DATABASE_WAIT_S, digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(digest, done))
        # Shielded: a caller that gives up (its client left, a timeout) leaves the others' lookup running.
        return await asyncio.shield(lookup)

    def _lookup_done(self, digest: str, lookup: asyncio.Future[ApiKeyInfo | None]) -> None:
        if self._lookups.get(digest) is lookup:
            del self._lookups[digest]
        if not lookup.cancelled():
            lookup.exception()  # retrieved here: every caller may have given up on it

    def _forget(self, digest: str) -> None:
        """Drop what is known of a key that changed here; lookups under way may predate the change."""
        self._changes += 1
        self._cache.pop(digest, None)
        self._lookups.pop(digest, None)

    async def _lookup_within(self, seconds: float, digest: str) -> ApiKeyInfo | None:
        # Bounded itself, not only by its callers' waits: a lookup stuck on a hung connection would
        # otherwise be joined by every later request with this key, after the database is back too.
        async with asyncio.timeout(seconds):
            return await self._lookup(digest)

    async def _lookup(self, digest: str) -> ApiKeyInfo | None:
        async with self._sessionmaker() as session:
            row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            return None if row is None else _snapshot(row)

    def _remember(self, digest: str, entry: _Cached, now: float) -> None:
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache = {k: v for k, v in self._cache.items() if v.until > now}
            while len(self._cache) >= MAX_CACHED_KEYS:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = entry

    @staticmethod
    async def _count(session: AsyncSession) -> int:
        return int(await session.scalar(select(func.count()).select_from(ApiKey)) or 0)

    @staticmethod
    async def _row_for_update(session: AsyncSession, key_id: str) -> ApiKey:
        row = None
        if _could_be_id(key_id):
            row = await session.scalar(select(ApiKey).where(ApiKey.id == key_id).with_for_update())
        if row is None:
            raise KeyNotFound(f"no API key has id {key_id!r}")
        return row
