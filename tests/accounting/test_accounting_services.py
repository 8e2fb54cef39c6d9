from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.accounting.keys import NewKey
from gateway.accounting.limits import MemoryLimiter, RedisLimiter
from gateway.accounting.services import ensure_initial_admin_key, initial_key_notice, open_accounting
from gateway.db import DatabaseBehind
from gateway.settings import Settings

if TYPE_CHECKING:
    from conftest import PostgresServer


async def test_first_run_creates_one_admin_key(tmp_path: Path) -> None:
    # The embedded default: a new SQLite file, migrated on open.
    accounting = await open_accounting(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/gateway.db"))
    try:
        assert isinstance(accounting.limiter, MemoryLimiter)
        plaintext = await ensure_initial_admin_key(accounting)
        assert plaintext is not None
        key = await accounting.keys.authenticate(plaintext)
        assert key is not None
        assert key.is_admin
        assert await ensure_initial_admin_key(accounting) is None
        assert await accounting.keys.count() == 1
    finally:
        await accounting.aclose()


@pytest.mark.postgres
async def test_postgres_behind_its_migrations_refuses_to_open(postgres_server: PostgresServer) -> None:
    url = await postgres_server.create(migrated=False)
    try:
        with pytest.raises(DatabaseBehind, match="llama-gateway db upgrade"):
            await open_accounting(Settings(database_url=url))
    finally:
        await postgres_server.drop(url)


async def test_a_preset_admin_key_is_used_and_not_echoed(db_url_migrated: str) -> None:
    preset = "sk-operator-chosen-0123456789"
    accounting = await open_accounting(Settings(database_url=db_url_migrated))
    try:
        assert await ensure_initial_admin_key(accounting, preset) is None
        key = await accounting.keys.authenticate(preset)
        assert key is not None
        assert key.is_admin
    finally:
        await accounting.aclose()


async def test_existing_keys_mean_no_first_run_key(db_url_migrated: str) -> None:
    accounting = await open_accounting(Settings(database_url=db_url_migrated))
    try:
        await accounting.keys.create(NewKey(name="already here"))
        assert await ensure_initial_admin_key(accounting) is None
    finally:
        await accounting.aclose()


async def test_a_redis_url_selects_the_shared_limiter(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/g.db", redis_url="redis://127.0.0.1:1/0")
    accounting = await open_accounting(settings)
    try:
        assert isinstance(accounting.limiter, RedisLimiter)
    finally:
        await accounting.aclose()


def test_the_first_run_notice_is_ready_to_paste() -> None:
    notice = initial_key_notice("sk-abc", "http://127.0.0.1:8000/", "llama-2-7b-chat")
    assert "    sk-abc\n" in notice
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in notice
    assert '"model": "llama-2-7b-chat"' in notice
    assert "Bearer sk-abc" in notice
