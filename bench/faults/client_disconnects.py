"""Client disconnects: hundreds of clients leave mid-stream or while their request waits for a slot.

The model runs two generations at a time, a token every 20 ms, so most of the ``50 * scale``
requests queue. A quarter of the clients send non-streamed requests and leave once the gateway
holds them all (most still queued); a quarter stream and leave as soon as the 200 arrives
(queued); a quarter leave after two tokens (mid-stream); a quarter read to the end.

Afterwards nothing may be left behind:

- no slot: the model's queue is empty and nothing runs (``/metrics``); the key's
  ``max_concurrency`` can be used in full again, all its requests at once;
- no budget reservation: a budget of exactly the recorded spend plus one request's worst case
  admits that request (and refuses the next for quota);
- exact bills: every admitted request has one usage row, and its ``completion_tokens`` are the
  tokens the engine generated for it (counted inside the engine), its prompt billed only when it
  reached the engine.

``run`` is ``async``; ``redis_url`` puts the key's limits in Redis instead of the gateway's process.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx

from bench.faults.live import (
    CountingBackend,
    LiveGateway,
    bearer,
    exact_fit,
    forget_redis_limits,
    migrated_sqlite,
    scripted_model,
    serving,
    usage_rows,
)
from bench.faults.report import ScenarioResult
from gateway.db import UsageRecord
from gateway.settings import Settings

CLIENTS_PER_SCALE = 50
TOKENS_BEFORE_LEAVING = 2
QUIET_WAIT_S = 60.0
POLL_S = 0.05
MODEL_NAME = "scripted"
BODY = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8}
SHORT_BODY = {**BODY, "max_tokens": 1}


@dataclass
class ClientDisconnectsResult(ScenarioResult):
    queue_left: float = 0
    """Requests the model's queue still counted as waiting or running once all clients were gone."""
    engine_active: int = 0
    """Generations the engine still ran once all clients were gone."""
    misbilled_rows: int = 0
    """Rows whose tokens differ from what the engine generated for the request (or engine work with no row)."""
    slots_refused_after: int = 0
    """Of ``max_concurrency`` requests sent together afterwards, those not served."""
    exact_fit_ok: bool = False
    clients: dict[str, int] = field(default_factory=dict)
    """How the storm's clients ended: left while queued, at the 200, mid-stream, or read to the end."""
    row_statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            super().ok
            and self.queue_left == 0
            and self.engine_active == 0
            and self.misbilled_rows == 0
            and self.slots_refused_after == 0
            and self.exact_fit_ok
        )


async def run(scale: int = 1, *, redis_url: str | None = None) -> ClientDisconnectsResult:
    clients = CLIENTS_PER_SCALE * scale
    model = scripted_model(
        MODEL_NAME,
        price_in=Decimal(1000),
        price_out=Decimal(10000),
        max_concurrency=2,
        max_queue=2 * clients,  # every client's request waits at once, twice over (the check afterwards)
        reply="one two three four five six seven eight nine ten",
        token_delay_ms=20,
    )
    backend = CountingBackend.for_model(model)
    with tempfile.TemporaryDirectory(prefix="client-disconnects-") as directory:
        database_url = await migrated_sqlite(Path(directory))
        settings = Settings(database_url=database_url, redis_url=redis_url, log_level="warning", models=[model])
        async with serving(settings, backends={model.name: backend}) as gateway:
            key_id, key = await gateway.create_key(name="leaving", max_concurrency=clients, budget_usd="1000")
            try:
                outcomes = await _storm(gateway, key, clients)
                queue_left = await _quiet(gateway, backend)
                rows = await _rows(database_url, key_id, clients)
                misbilled = _misbilled(rows, backend.generated)
                after = await _all_at_once(gateway, key, clients)
                fit = await exact_fit(gateway, key_id, key, database_url, SHORT_BODY, model)
            finally:
                if redis_url is not None:
                    await forget_redis_limits(redis_url, key_id)
    sent = 2 * clients + fit.sent
    served = outcomes["read to the end"] + after[200] + fit.served
    result = ClientDisconnectsResult(
        name=f"client disconnects ({'Redis' if redis_url else 'in-process'} limits)",
        sent=sent,
        served=served,
        failed=sent - served,
        usage_rows=len(rows),
        expected_rows=clients - outcomes["not admitted"],
        server_errors=sum(n for status, n in after.items() if status >= 500 and status != 503),
        queue_left=queue_left,
        engine_active=backend.active,
        misbilled_rows=misbilled,
        slots_refused_after=clients - after[200],
        exact_fit_ok=fit.ok,
        clients=dict(outcomes),
        row_statuses=dict(Counter(row.status for row in rows)),
    )
    result.notes.append(
        f"clients: {dict(outcomes)}; the engine generated {sum(backend.generated[r.request_id] for r in rows)} "
        f"tokens for them, their rows bill {sum(row.completion_tokens for row in rows)}; "
        f"rows {result.row_statuses}; statuses after {dict(after)}; "
        f"exact fit {fit.fitting_status} then {fit.beyond_code}"
    )
    return result


async def _storm(gateway: LiveGateway, key: str, clients: int) -> Counter[str]:
    """All clients at once, each leaving in its own way; counts how each one ended."""
    outcomes: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=120, limits=limits) as http:
        kinds = list(itertools.islice(itertools.cycle(("queued", "headers", "mid-stream", "end")), clients))
        # Non-streamed requests first, so that they are all held (queued) before their clients leave.
        waiting = [asyncio.create_task(_wait_for_answer(http)) for kind in kinds if kind == "queued"]
        await _held_by_gateway(gateway, len(waiting), waiting)
        streams = [asyncio.create_task(_stream(http, kind)) for kind in kinds if kind != "queued"]
        for task in waiting:
            task.cancel()  # the client leaves: httpx closes the connection
        for ended in await asyncio.gather(*waiting, return_exceptions=True):
            outcomes["left while queued" if isinstance(ended, asyncio.CancelledError) else str(ended)] += 1
        outcomes.update(await asyncio.gather(*streams))
    return outcomes


async def _wait_for_answer(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/chat/completions", json=BODY)
    return "answered before leaving" if response.status_code == 200 else "not admitted"


async def _held_by_gateway(gateway: LiveGateway, count: int, tasks: list[asyncio.Task[str]]) -> None:
    """Wait until the model's queue holds (or has answered) all ``count`` requests."""
    queue = gateway.state.models.get(MODEL_NAME).queue
    for _ in range(int(QUIET_WAIT_S / POLL_S)):
        if queue.running + queue.waiting + sum(task.done() for task in tasks) >= count:
            return
        await asyncio.sleep(POLL_S)


async def _stream(http: httpx.AsyncClient, kind: str) -> str:
    async with http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as response:
        if response.status_code != 200:
            return "not admitted"
        if kind == "headers":
            return "left at the 200"
        tokens = 0
        async for line in response.aiter_lines():
            if '"content"' in line:
                tokens += 1
                if kind == "mid-stream" and tokens == TOKENS_BEFORE_LEAVING:
                    return "left mid-stream"
            if line == "data: [DONE]":
                return "read to the end"
    return "cut off"


async def _quiet(gateway: LiveGateway, backend: CountingBackend) -> float:
    """Wait (a while) until the model's queue is empty and the engine idle; what ``/metrics`` says is left."""
    model = {("model", MODEL_NAME)}
    left = 0.0
    for _ in range(int(QUIET_WAIT_S / POLL_S)):
        samples = await gateway.metrics()
        left = samples.get(("llama_gateway_queue_depth", frozenset(model)), 0.0) + samples.get(
            ("llama_gateway_running_requests", frozenset(model)), 0.0
        )
        if left == 0 and backend.active == 0:
            break
        await asyncio.sleep(POLL_S)
    return left


async def _rows(database_url: str, key_id: str, expected: int) -> list[UsageRecord]:
    """The key's rows, waiting (a while) for those written in the background after a client left."""
    rows = await usage_rows(database_url, key_id)
    for _ in range(int(QUIET_WAIT_S / POLL_S)):
        if len(rows) >= expected:
            break
        await asyncio.sleep(POLL_S)
        rows = await usage_rows(database_url, key_id)
    return rows


def _misbilled(rows: list[UsageRecord], generated: Counter[str]) -> int:
    """Rows that bill other than what the engine generated, plus engine work that has no row."""
    prompt_sizes = {row.prompt_tokens for row in rows if row.completion_tokens}
    wrong = sum(
        row.completion_tokens != generated[row.request_id]
        or (row.prompt_tokens not in {0, *prompt_sizes})
        or (generated[row.request_id] > 0 and row.prompt_tokens == 0)
        for row in rows
    )
    billed = {row.request_id for row in rows}
    return wrong + sum(1 for request_id, tokens in generated.items() if tokens and request_id not in billed)


async def _all_at_once(gateway: LiveGateway, key: str, count: int) -> Counter[int]:
    """``count`` short requests together: the key's whole ``max_concurrency``."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=120, limits=limits) as http:

        async def one() -> int:
            try:
                return (await http.post("/v1/chat/completions", json=SHORT_BODY)).status_code
            except httpx.TransportError:
                return 0

        return Counter(await asyncio.gather(*(one() for _ in range(count))))
