"""A test database that can be taken away: a fresh PostgreSQL database reached through a TCP proxy.

The machine's PostgreSQL server is shared and is never stopped; cutting the proxy (``cut``)
is what the code under test sees as the database going away, ``stall`` as it hanging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from bench.faults.harness import StallingTcpProxy
from tests.support.databases import PostgresServer


@dataclass(frozen=True)
class ProxiedDatabase:
    proxy: StallingTcpProxy
    url: str
    """Through the proxy: what the code under test connects to."""
    direct_url: str
    """Around the proxy: what the test checks rows with."""


@asynccontextmanager
async def database_behind_proxy(server: PostgresServer) -> AsyncIterator[ProxiedDatabase]:
    """A migrated database of this test's own, and a proxy in front of it, both gone afterwards."""
    direct_url = await server.create(migrated=True)
    target = make_url(direct_url)
    proxy = StallingTcpProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        yield ProxiedDatabase(proxy, url, direct_url)
    finally:
        await proxy.aclose()
        await server.drop(direct_url)
