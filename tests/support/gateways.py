"""Live gateways on a test database, and what the accounting tests ask of them over HTTP.

Tests take their database from the ``db_url_migrated`` fixture (or ``shared_database`` for a
gateway that a whole module shares), so each runs on SQLite and on PostgreSQL. Usage rows are
read back straight from the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import select

from gateway.db import UsageRecord, make_engine, make_sessionmaker, upgrade_database
from gateway.settings import ModelConfig, Settings
from tests.support import model_configs
from tests.support.live import LiveGateway, running_gateway

if TYPE_CHECKING:
    from tests.support.databases import PostgresServer

REDIS_LIMITS_PREFIX = "llama-gateway:limits"


def scripted_model(
    name: str,
    *,
    price_in: str = "0",
    price_out: str = "0",
    max_concurrency: int = 64,
    max_queue: int = 512,
    **options: Any,
) -> ModelConfig:
    """A scripted model with room for the concurrency the accounting tests drive."""
    return model_configs.scripted_model(
        name,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        input_price=price_in,
        output_price=price_out,
        **options,
    )


@asynccontextmanager
async def shared_database(server: PostgresServer | None, directory: Path) -> AsyncIterator[str]:
    """A migrated database on ``server`` (dropped afterwards), or a SQLite file in ``directory``."""
    if server is None:
        url = f"sqlite+aiosqlite:///{directory / 'gateway.db'}"
        await upgrade_database(url)
        yield url
        return
    url = await server.create(migrated=True)
    try:
        yield url
    finally:
        await server.drop(url)


def settings_for(url: str, models: list[ModelConfig], **fields: Any) -> Settings:
    return Settings(database_url=url, models=models, log_level="warning", **fields)


@contextmanager
def gateway(url: str, models: list[ModelConfig], **fields: Any) -> Iterator[LiveGateway]:
    with running_gateway(settings_for(url, models, **fields)) as live:
        yield live


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def admin_client(live: LiveGateway) -> httpx.Client:
    return httpx.Client(base_url=live.base_url, headers=bearer(live.admin_key), timeout=60)


def create_key(live: LiveGateway, **fields: Any) -> tuple[str, str]:
    """A new key made through the admin API: (id, plaintext)."""
    with admin_client(live) as admin:
        response = admin.post("/admin/keys", json=fields)
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["key"]


async def usage_rows(url: str) -> dict[str, UsageRecord]:
    """Every usage row, by request id."""
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as session:
            rows = (await session.scalars(select(UsageRecord))).all()
    finally:
        await engine.dispose()
    return {row.request_id: row for row in rows}


async def forget_redis_limits(redis_url: str, key_ids: list[str]) -> None:
    """Delete the limiter's Redis state of these keys (a total budget's spend never expires)."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        for key_id in key_ids:
            async for name in client.scan_iter(match=f"{REDIS_LIMITS_PREFIX}:{{{key_id}}}:*"):
                await client.delete(name)
    finally:
        await client.aclose()


def exact_cost(tokens: int, per_million: Decimal) -> Decimal:
    """What ``tokens`` cost, computed apart from the gateway's own pricing code."""
    return Decimal(tokens) * per_million / Decimal(1_000_000)
