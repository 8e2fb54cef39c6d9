"""Budget race: many requests at once against a budget with room for only a few of them.

A key spends most of its budget in a few warm-up requests; then ``100 * scale`` clients send one
request each, all at once. Budgets reserve a request's worst-case cost at admission, so however
the requests interleave, the spend recorded in the usage rows stays within the budget, and every
request turned away gets 429 in OpenAI's envelope (``insufficient_quota`` when the budget cannot
cover it, ``rate_limit_exceeded`` while requests in flight hold what is left).

Two set-ups: one gateway on SQLite with limits in its own process (``run(scale)``), or
``replicas`` gateways sharing PostgreSQL and Redis (``run(scale, postgres_url=..., redis_url=...)``).
``run`` is ``async``.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx

from bench.faults.harness import ScratchDatabases
from bench.faults.live import (
    LiveGateway,
    bearer,
    forget_redis_limits,
    is_openai_error,
    migrated_sqlite,
    scripted_model,
    serving,
    spent,
    usage_rows,
)
from bench.faults.report import ScenarioResult
from gateway.db import upgrade_database
from gateway.settings import Settings

CLIENTS_PER_SCALE = 100
WARM_UP_REQUESTS = 3
PRICE_IN, PRICE_OUT = Decimal(1000), Decimal(10000)  # per 1M tokens: $0.001 and $0.01 a token
MAX_TOKENS = 20
REPLY = "one two three four five"  # ends well below MAX_TOKENS: settling gives back most of a hold
ROOM_IN_WORST_CASES = Decimal("3.5")
"""What is left of the budget after the warm-up, in worst-case costs of one request."""
MODEL = "metered"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "What does it cost?"}], "max_tokens": MAX_TOKENS}
REFUSAL_CODES = {"insufficient_quota", "rate_limit_exceeded"}


@dataclass
class BudgetRaceResult(ScenarioResult):
    budget_usd: str = "0"
    spent_usd: str = "0"
    """What the key's usage rows add up to, warm-up included."""
    refused: int = 0
    """Requests answered 429 in OpenAI's envelope with a budget or rate-limit code."""
    malformed_refusals: int = 0
    """Refusals that were not 429, or whose body was not OpenAI's error envelope."""

    @property
    def ok(self) -> bool:
        return (
            super().ok
            and Decimal(self.spent_usd) <= Decimal(self.budget_usd)
            and self.malformed_refusals == 0
            and self.served + self.refused == self.sent
        )


async def run(
    scale: int = 1,
    *,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    replicas: int = 1,
) -> BudgetRaceResult:
    """``postgres_url`` names a server to create a scratch database on (SQLite otherwise)."""
    scratch = ScratchDatabases(postgres_url) if postgres_url else None
    with tempfile.TemporaryDirectory(prefix="budget-race-") as directory:
        try:
            database_url = await _database(scratch, Path(directory))
            return await _race(CLIENTS_PER_SCALE * scale, database_url, redis_url, replicas)
        finally:
            if scratch is not None:
                await scratch.drop_all()


async def _database(scratch: ScratchDatabases | None, directory: Path) -> str:
    if scratch is None:
        return await migrated_sqlite(directory)
    url = scratch.url(await scratch.create("budget_race"))
    await upgrade_database(url)
    return url


async def _race(clients: int, database_url: str, redis_url: str | None, replicas: int) -> BudgetRaceResult:
    model = scripted_model(
        MODEL, price_in=PRICE_IN, price_out=PRICE_OUT, max_concurrency=64, max_queue=4 * clients, reply=REPLY
    )
    async with contextlib.AsyncExitStack() as stack:
        gateways = [
            await stack.enter_async_context(
                serving(Settings(database_url=database_url, redis_url=redis_url, log_level="warning", models=[model]))
            )
            for _ in range(replicas)
        ]
        key_id, key = await gateways[0].create_key(name="nearly spent")
        if redis_url is not None:
            stack.push_async_callback(forget_redis_limits, redis_url, key_id)
        budget = await _spend_most_of_the_budget(gateways[0], key_id, key, database_url)
        outcomes, codes, malformed = await _send_at_once(gateways, key, clients)
    rows = await usage_rows(database_url, key_id)
    result = BudgetRaceResult(
        name=f"budget race ({'PostgreSQL + Redis' if redis_url else 'SQLite'}, {replicas} gateway(s))",
        sent=clients,
        served=outcomes[200],
        failed=clients - outcomes[200],
        usage_rows=len(rows) - WARM_UP_REQUESTS,
        expected_rows=outcomes[200],
        server_errors=sum(n for status, n in outcomes.items() if status >= 500 and status != 503),
        budget_usd=str(budget),
        spent_usd=str(spent(rows)),
        refused=outcomes[429] - malformed,
        malformed_refusals=malformed + sum(n for status, n in outcomes.items() if status not in (200, 429)),
    )
    result.notes.append(f"budget ${budget}, spent ${result.spent_usd}; refusals {dict(sorted(codes.items()))}")
    return result


async def _spend_most_of_the_budget(gateway: LiveGateway, key_id: str, key: str, database_url: str) -> Decimal:
    """Spend with a few requests, then give the key a budget a few worst cases above that spend."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=60) as client:
        for _ in range(WARM_UP_REQUESTS):
            response = await client.post("/v1/chat/completions", json=BODY)
            response.raise_for_status()
    rows = await usage_rows(database_url, key_id)
    worst_case = (rows[0].prompt_tokens * PRICE_IN + MAX_TOKENS * PRICE_OUT) / 1_000_000
    budget = spent(rows) + ROOM_IN_WORST_CASES * worst_case
    await gateway.update_key(key_id, budget_usd=str(budget))
    return budget


async def _send_at_once(gateways: list[LiveGateway], key: str, clients: int) -> tuple[Counter[int], Counter[str], int]:
    """One request per client, all in flight together: statuses, error codes, malformed refusals."""
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    malformed = 0
    start = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    http = [httpx.AsyncClient(base_url=g.base_url, headers=bearer(key), timeout=120, limits=limits) for g in gateways]

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal malformed
        await start.wait()
        try:
            response = await client.post("/v1/chat/completions", json=BODY)
        except httpx.TransportError:
            statuses[0] += 1
            return
        statuses[response.status_code] += 1
        if is_openai_error(response):
            codes[f"{response.status_code} {response.json()['error']['code']}"] += 1
        if response.status_code == 429 and not (
            is_openai_error(response) and response.json()["error"]["code"] in REFUSAL_CODES
        ):
            malformed += 1

    try:
        tasks = [asyncio.create_task(one(http[i % len(http)])) for i in range(clients)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    finally:
        for client in http:
            await client.aclose()
    return statuses, codes, malformed
