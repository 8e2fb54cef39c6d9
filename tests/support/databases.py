"""The PostgreSQL and Redis servers the database tests run against.

A service that is down fails the run under CI (``CI=true``) and skips its tests elsewhere.
"""

from __future__ import annotations

import os
import uuid
from typing import NoReturn

import pytest

POSTGRES_URL = os.environ.get("LLAMA_GATEWAY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLAMA_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_unavailable(what: str, error: BaseException) -> NoReturn:
    message = f"{what} is not reachable: {error!r}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class PostgresServer:
    """Creates uniquely named databases on the test server; each is dropped after its test."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self._url = make_url(url)
        self._run = f"lgw_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._created = 0
        self._template: str | None = None

    def url_for(self, database: str) -> str:
        return self._url.set(drivername="postgresql+asyncpg", database=database).render_as_string(False)

    async def execute(self, sql: str) -> None:
        import asyncpg

        connection = await asyncpg.connect(self._url.set(drivername="postgresql").render_as_string(False))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    async def create(self, *, migrated: bool) -> str:
        """A fresh database: empty, or a copy of one migrated to head (copying beats migrating)."""
        self._created += 1
        name = f"{self._run}_{self._created}"
        if migrated and self._template is None:
            from gateway.db import upgrade_database

            self._template = f"{self._run}_template"
            await self.execute(f'CREATE DATABASE "{self._template}"')
            await upgrade_database(self.url_for(self._template))
        template = f' TEMPLATE "{self._template}"' if migrated else ""
        await self.execute(f'CREATE DATABASE "{name}"{template}')
        return self.url_for(name)

    async def drop(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        await self.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')

    async def close(self) -> None:
        if self._template is not None:
            await self.execute(f'DROP DATABASE IF EXISTS "{self._template}" WITH (FORCE)')
