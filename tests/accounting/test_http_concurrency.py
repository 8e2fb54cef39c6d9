"""Hundreds of concurrent requests from many keys, plain, streamed and cut off mid-stream: every
request has exactly one usage row, and its tokens and costs are exactly what the client was told.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

import httpx

from gateway.db import UsageRecord
from tests.support.gateways import (
    bearer,
    create_key,
    exact_cost,
    gateway,
    scripted_model,
    usage_rows,
)

REQUESTS = 300
KEYS = 20
CLIENT_CONCURRENCY = 100
CHUNKS_BEFORE_HANGING_UP = 3
ROWS_TIMEOUT_S = 30.0
# Prices with at most four decimals per 1M tokens: every cost is exact at ten places, no rounding.
PRICES = {
    "alpha": (Decimal("0.65"), Decimal("2.75")),
    "beta": (Decimal("1.2345"), Decimal("9.8765")),
}
ALPHA_REPLY = " ".join(f"w{i}" for i in range(30))  # ends with EOS after 30 tokens


@dataclass
class Outcome:
    """What one client saw."""

    request_id: str
    key_id: str
    model: str
    kind: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0
    """Content chunks received (streams)."""


def plan(index: int) -> tuple[str, str, int]:
    """(kind, model, max_tokens) of request ``index``."""
    kind = ("plain", "stream", "cancel")[index % 3]
    if kind == "cancel":
        return kind, "beta", 4000  # seconds of tokens: always cut off by the client first
    model = "alpha" if index % 2 else "beta"
    return kind, model, 1 + (index * 7) % 45


def messages(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {index}:" + " more" * (index % 17)}]


async def one_request(client: httpx.AsyncClient, index: int, key: tuple[str, str], limit: asyncio.Semaphore) -> Outcome:
    kind, model, max_tokens = plan(index)
    body: dict[str, object] = {"model": model, "messages": messages(index), "max_tokens": max_tokens}
    async with limit:
        if kind == "plain":
            response = await client.post("/v1/chat/completions", json=body, headers=bearer(key[1]))
            assert response.status_code == 200, response.text
            data = response.json()
            return Outcome(
                response.headers["x-request-id"],
                key[0],
                model,
                kind,
                data["usage"]["prompt_tokens"],
                data["usage"]["completion_tokens"],
                data["choices"][0]["finish_reason"],
            )
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=bearer(key[1])) as response:
            assert response.status_code == 200
            outcome = Outcome(response.headers["x-request-id"], key[0], model, kind)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    outcome.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        outcome.chunks += 1
                    outcome.finish_reason = choice["finish_reason"] or outcome.finish_reason
                if kind == "cancel" and outcome.chunks == CHUNKS_BEFORE_HANGING_UP:
                    break  # leaving the block closes the connection mid-stream
            return outcome


async def wait_for_rows(url: str, count: int) -> dict[str, UsageRecord]:
    """Rows of cancelled streams are written after the connection is gone; give them a moment."""
    deadline = time.monotonic() + ROWS_TIMEOUT_S
    while True:
        rows = await usage_rows(url)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_usage_rows_equal_what_the_clients_received(db_url_migrated: str) -> None:
    models = [
        scripted_model("alpha", price_in="0.65", price_out="2.75", reply=ALPHA_REPLY, token_delay_ms=1),
        scripted_model("beta", price_in="1.2345", price_out="9.8765", token_delay_ms=2, end_with_eos=False),
    ]
    with gateway(db_url_migrated, models) as live:
        keys = [create_key(live, name=f"tenant-{n}") for n in range(KEYS)]
        limit = asyncio.Semaphore(CLIENT_CONCURRENCY)
        connections = httpx.Limits(max_connections=CLIENT_CONCURRENCY)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=120, limits=connections) as client:
            outcomes = await asyncio.gather(*(one_request(client, i, keys[i % KEYS], limit) for i in range(REQUESTS)))
            rows = await wait_for_rows(db_url_migrated, REQUESTS)
            admin = bearer(live.admin_key)
            by_key = (await client.get("/admin/usage", params={"group_by": "key"}, headers=admin)).json()
            by_model = (await client.get("/admin/usage", params={"group_by": "model"}, headers=admin)).json()

    # One row per request, and no other.
    assert sorted(rows) == sorted(o.request_id for o in outcomes)
    expected_in: defaultdict[str, Decimal] = defaultdict(Decimal)
    expected_out: defaultdict[str, Decimal] = defaultdict(Decimal)
    for outcome in outcomes:
        row = rows[outcome.request_id]
        assert (row.key_id, row.model) == (outcome.key_id, outcome.model)
        price_in, price_out = PRICES[outcome.model]
        assert (row.input_price_per_million, row.output_price_per_million) == (price_in, price_out)
        if outcome.kind == "cancel":
            assert row.status == "cancelled"
            # Billed for everything generated, which is at least what reached the client.
            assert row.completion_tokens >= outcome.chunks == CHUNKS_BEFORE_HANGING_UP
            prompt, completion = row.prompt_tokens, row.completion_tokens
        else:
            assert outcome.prompt_tokens is not None
            assert outcome.completion_tokens is not None
            assert (row.prompt_tokens, row.completion_tokens) == (outcome.prompt_tokens, outcome.completion_tokens)
            assert row.status == ("length" if outcome.finish_reason == "length" else "completed")
            assert row.finish_reason == outcome.finish_reason
            if outcome.kind == "stream":
                assert outcome.chunks == outcome.completion_tokens  # one scripted token per chunk
            prompt, completion = outcome.prompt_tokens, outcome.completion_tokens
        assert row.input_cost == exact_cost(prompt, price_in)
        assert row.output_cost == exact_cost(completion, price_out)
        expected_in[outcome.key_id] += exact_cost(prompt, price_in)
        expected_out[outcome.key_id] += exact_cost(completion, price_out)

    statuses = {row.status for row in rows.values()}
    assert statuses == {"completed", "length", "cancelled"}
    # The admin report adds up the same rows to the same exact amounts.
    reported = {row["group"]: row for row in by_key["data"]}
    assert set(reported) == {key_id for key_id, _ in keys}
    for key_id in reported:
        assert Decimal(reported[key_id]["input_cost_usd"]) == expected_in[key_id]
        assert Decimal(reported[key_id]["output_cost_usd"]) == expected_out[key_id]
    assert by_key["total"]["requests"] == REQUESTS
    total = sum(expected_in.values(), Decimal(0)) + sum(expected_out.values(), Decimal(0))
    assert Decimal(by_key["total"]["total_cost_usd"]) == total
    assert Decimal(by_model["total"]["total_cost_usd"]) == total
    tokens = {m: sum(r.completion_tokens for r in rows.values() if r.model == m) for m in PRICES}
    assert {row["group"]: row["completion_tokens"] for row in by_model["data"]} == tokens
