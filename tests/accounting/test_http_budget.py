"""Many concurrent requests on a key with a small budget never spend more than the budget, on one
gateway (in-process or Redis limits) and on two gateways sharing Redis and PostgreSQL.

Each client retries while the budget is only held by requests in flight (429
``rate_limit_exceeded``) and stops at its first answer or at ``insufficient_quota``, so the key's
budget ends up spent as far as it goes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.gateways import (
    bearer,
    create_key,
    exact_cost,
    forget_redis_limits,
    gateway,
    scripted_model,
    usage_rows,
)

if TYPE_CHECKING:
    from conftest import PostgresServer

CLIENTS = 60
BUDGET = Decimal("2")
PRICE_IN, PRICE_OUT = Decimal("1000"), Decimal("10000")  # per 1M tokens: $0.001 and $0.01 a token
MAX_TOKENS = 20
REPLY_TOKENS = 5  # the reply ends well below max_tokens: settling gives back most of each reservation
MODEL = scripted_model(
    "metered",
    price_in=str(PRICE_IN),
    price_out=str(PRICE_OUT),
    reply="one two three four five",
    token_delay_ms=5,
)
BODY = {"model": "metered", "messages": [{"role": "user", "content": "What does it cost?"}], "max_tokens": MAX_TOKENS}


@pytest.fixture
async def forgotten_keys(redis_url: str | None) -> AsyncIterator[list[str]]:
    """Key ids whose Redis limiter state is deleted after the test."""
    key_ids: list[str] = []
    yield key_ids
    if redis_url is not None:
        await forget_redis_limits(redis_url, key_ids)


async def spend_until_refused(base_urls: list[str], key: str) -> tuple[Counter[str], list[httpx.Response]]:
    """Run the clients; count their outcomes and keep the final refusals."""
    outcomes: Counter[str] = Counter()
    refusals: list[httpx.Response] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            response = await client.post("/v1/chat/completions", json=BODY, headers=bearer(key))
            if response.status_code == 200:
                assert response.json()["usage"]["completion_tokens"] == REPLY_TOKENS
                outcomes["ok"] += 1
                return
            assert response.status_code == 429, response.text
            code = response.json()["error"]["code"]
            if code == "insufficient_quota":
                outcomes["exhausted"] += 1
                refusals.append(response)
                return
            assert code == "rate_limit_exceeded", response.text
            outcomes["held"] += 1
            await asyncio.sleep(0.02)

    clients = [httpx.AsyncClient(base_url=url, timeout=60) for url in base_urls]
    try:
        await asyncio.gather(*(client_loop(clients[i % len(clients)]) for i in range(CLIENTS)))
    finally:
        for client in clients:
            await client.aclose()
    return outcomes, refusals


async def check_spend(url: str, key_id: str, outcomes: Counter[str], refusals: list[httpx.Response]) -> None:
    rows = [row for row in (await usage_rows(url)).values() if row.key_id == key_id]
    assert len(rows) == outcomes["ok"]
    spent = sum((row.input_cost + row.output_cost for row in rows), Decimal(0))
    assert spent <= BUDGET
    # Spent as far as it goes: the last refusal was right, one more request could have overspent.
    prompt_tokens = rows[0].prompt_tokens
    worst_case = exact_cost(prompt_tokens, PRICE_IN) + exact_cost(MAX_TOKENS, PRICE_OUT)
    assert spent + worst_case > BUDGET
    # Real work was admitted and refused: several requests ran, several were turned away.
    assert outcomes["ok"] > 5
    assert outcomes["exhausted"] > 5
    for refusal in refusals:
        error = refusal.json()["error"]
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
        assert refusal.headers["x-should-retry"] == "false"


async def test_concurrent_requests_never_overspend_a_budget(
    db_url_migrated: str, redis_url: str | None, forgotten_keys: list[str]
) -> None:
    with gateway(db_url_migrated, [MODEL], redis_url=redis_url) as live:
        key_id, key = create_key(live, name="small budget", budget_usd=str(BUDGET))
        forgotten_keys.append(key_id)
        outcomes, refusals = await spend_until_refused([live.base_url], key)
    await check_spend(db_url_migrated, key_id, outcomes, refusals)


@pytest.mark.postgres
@pytest.mark.redis
async def test_two_gateways_sharing_redis_and_postgres_never_overspend(
    postgres_server: PostgresServer, redis_server: str
) -> None:
    url = await postgres_server.create(migrated=True)
    try:
        with (
            gateway(url, [MODEL], redis_url=redis_server) as first,
            gateway(url, [MODEL], redis_url=redis_server) as second,
        ):
            key_id, key = create_key(first, name="small shared budget", budget_usd=str(BUDGET))
            try:
                outcomes, refusals = await spend_until_refused([first.base_url, second.base_url], key)
            finally:
                await forget_redis_limits(redis_server, [key_id])
        await check_spend(url, key_id, outcomes, refusals)
    finally:
        await postgres_server.drop(url)
