"""PostgreSQL goes away and comes back: requests fail closed or succeed, and usage is neither lost nor doubled.

The database is a fresh one on the test server, reached through a TCP proxy that the tests cut;
the server itself is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from bench.faults import database_outage
from gateway.accounting.keys import NewKey
from gateway.accounting.services import Accounting, open_accounting
from gateway.errors import ApiError
from gateway.settings import Settings
from tests.support.databases import POSTGRES_URL, PostgresServer
from tests.support.live import running_gateway
from tests.support.model_configs import scripted_model
from tests.support.outages import ProxiedDatabase, database_behind_proxy

pytestmark = pytest.mark.postgres


def assert_outage_invariants(result: database_outage.DatabaseOutageResult) -> None:
    assert result.ok, result.notes
    assert set(result.statuses) <= {200, 503}, result.statuses
    assert result.unexpected_rows == 0
    assert result.incomplete_streams == 0
    # The outage really happened to requests in flight, and their rows went through the spool.
    assert result.spooled > 0
    assert result.replayed == result.spooled
    # A key the gateway had not cached was never served while it could not be checked.
    assert result.unknown_key_tries > 0
    assert result.unknown_key_refused == result.unknown_key_tries
    # The crash case: served while the database was away, killed, and the rows came back from disk.
    assert result.crash_served > 0
    assert result.crash_spool_bytes > 0
    assert result.crash_rows == result.crash_served


async def test_an_outage_under_load_and_a_crash_lose_and_double_no_usage(postgres_server: PostgresServer) -> None:
    assert_outage_invariants(await database_outage.run(1, postgres_url=POSTGRES_URL))


@pytest.mark.long
async def test_a_longer_outage_under_more_load_loses_and_doubles_no_usage(postgres_server: PostgresServer) -> None:
    assert_outage_invariants(await database_outage.run(4, postgres_url=POSTGRES_URL))


@pytest.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[ProxiedDatabase]:
    async with database_behind_proxy(postgres_server) as database:
        yield database


@pytest.fixture
async def accounting(database: ProxiedDatabase, tmp_path: Path) -> AsyncIterator[Accounting]:
    accounting = await open_accounting(Settings(database_url=database.url, data_dir=str(tmp_path)))
    yield accounting
    await database.proxy.restore()
    await accounting.aclose()


def assert_refused_until_later(error: ApiError) -> None:
    assert error.status == 503
    assert error.code == "database_unavailable"
    assert int(error.headers["Retry-After"]) >= 1
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


async def test_only_keys_in_the_cache_are_served_while_the_database_is_away(
    accounting: Accounting, database: ProxiedDatabase
) -> None:
    _, cached = await accounting.keys.create(NewKey(name="in the cache"))
    _, uncached = await accounting.keys.create(NewKey(name="not in the cache"))
    assert await accounting.keys.authenticate(cached) is not None
    await database.proxy.cut()
    assert await accounting.keys.authenticate(cached) is not None
    with pytest.raises(ApiError) as refused:
        await accounting.keys.authenticate(uncached)
    assert_refused_until_later(refused.value)


async def test_a_budget_that_cannot_be_checked_refuses_the_request(
    accounting: Accounting, database: ProxiedDatabase
) -> None:
    budgeted, _ = await accounting.keys.create(NewKey(name="budgeted", budget_usd=Decimal("5")))
    unlimited, _ = await accounting.keys.create(NewKey(name="unlimited"))
    await database.proxy.cut()
    # No limits: nothing to ask the database, the request is admitted.
    hold = await accounting.limiter.admit(unlimited, max_tokens=100, worst_case_cost=Decimal("0.01"))
    await hold.settle(10, Decimal("0.001"))
    # Its spend is in the usage table, out of reach: admitting it could overspend the budget.
    with pytest.raises(ApiError) as refused:
        await accounting.limiter.admit(budgeted, max_tokens=100, worst_case_cost=Decimal("0.01"))
    assert_refused_until_later(refused.value)


async def test_a_database_that_hangs_refuses_uncached_keys_instead_of_keeping_them_waiting(
    accounting: Accounting, database: ProxiedDatabase
) -> None:
    _, key = await accounting.keys.create(NewKey(name="never cached"))
    database.proxy.stall()
    try:
        with pytest.raises(ApiError) as refused:
            await accounting.keys.authenticate(key)
    finally:
        database.proxy.flow()
    assert_refused_until_later(refused.value)


async def test_admin_and_usage_routes_answer_503_while_the_database_is_away(
    database: ProxiedDatabase, tmp_path: Path
) -> None:
    settings = Settings(database_url=database.url, data_dir=str(tmp_path), models=[scripted_model("m")])
    with contextlib.ExitStack() as stack:
        # The proxy runs on this loop: the gateway's blocking start-up waits in a thread.
        live = await asyncio.to_thread(stack.enter_context, running_gateway(settings))
        try:
            headers = {"Authorization": f"Bearer {live.admin_key}"}
            async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as client:
                assert (await client.get("/admin/keys")).status_code == 200  # the admin key is cached now
                await database.proxy.cut()
                try:
                    for path in ("/admin/keys", "/admin/usage", "/v1/usage"):
                        response = await client.get(path)
                        assert response.status_code == 503, (path, response.text)
                        assert response.json()["error"]["code"] == "database_unavailable"
                        assert int(response.headers["retry-after"]) >= 1
                finally:
                    await database.proxy.restore()
                assert (await client.get("/admin/keys")).status_code == 200
        finally:
            await asyncio.to_thread(stack.close)
