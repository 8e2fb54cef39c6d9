"""Clients for the module's live gateway (each API test module defines its own ``served``)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support.databases import PostgresServer
from tests.support.served import Served


# Each module defines its own ``served`` gateway; these clients follow whichever one it is.
@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with served.client() as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.http() as client:
        yield client


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_server(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The database server a module's gateway runs on: none (a SQLite file), then PostgreSQL."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server
    return None
