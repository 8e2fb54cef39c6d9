"""PostgreSQL goes away under load and comes back; then the gateway is killed while it holds spooled usage.

A real ``llama-gateway serve`` (scripted model) reaches a fresh PostgreSQL database through a TCP
proxy. Concurrent clients send chat completions, streamed and not. Mid-load the proxy resets every
connection and refuses new ones for a few seconds, then lets them through again, while the load
goes on. Meanwhile a key the gateway has not cached tries too: it must be refused with 503 and
``Retry-After``, never served unauthenticated. Afterwards, once the spool is replayed, every request
answered 200 must have exactly one usage row, and nothing else may have one.

The crash case: the database goes away again, requests are served (their rows only in the spool),
the gateway is killed with SIGKILL, the database comes back, a new gateway process starts on the
same data directory, and the spooled rows must reach the database.

``run`` is a coroutine (``async def``); ``scale`` multiplies the clients and the crash case's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from bench.faults.child_gateway import ChildGateway, child_gateway
from bench.faults.harness import ScratchDatabases, TcpProxy
from bench.faults.live import bearer, is_openai_error, scripted_model
from bench.faults.report import ScenarioResult
from gateway.db import UsageRecord, make_engine, make_sessionmaker, upgrade_database

NAME = "database_outage"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
CLIENTS_PER_SCALE = 6
CRASH_REQUESTS_PER_SCALE = 6
WARM_UP_S = 1.5
OUTAGE_S = 3.0
RECOVERY_S = 2.0
UNKNOWN_KEY_TRIES = 3
REPLAY_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 60.0
# Longer than the whole scenario: the clients' key stays cached through both outages.
KEY_CACHE_S = 600


@dataclass
class DatabaseOutageResult(ScenarioResult):
    spooled: int = 0
    """Usage rows the first gateway wrote to its spool (its ``/metrics``)."""
    replayed: int = 0
    """Spooled rows it committed once the database was back."""
    unknown_key_tries: int = 0
    """Requests with a key the gateway had not cached, sent while the database was away."""
    unknown_key_refused: int = 0
    """Of those, the ones refused with 503, ``Retry-After`` and OpenAI's error envelope."""
    unexpected_rows: int = 0
    """Usage rows of requests that were not answered 200 (there must be none)."""
    crash_spool_bytes: int = 0
    """Size of the spool on disk when the gateway was killed."""
    crash_served: int = 0
    """Requests answered 200 while the database was away in the crash case."""
    crash_rows: int = 0
    """Of those, the ones whose row the restarted gateway replayed."""
    incomplete_streams: int = 0
    """Streams answered 200 that ended without ``[DONE]`` (their rows still count)."""
    statuses: dict[int, int] = field(default_factory=dict)
    """Every HTTP status the clients got, with how often."""


@dataclass
class _Tally:
    sent: int = 0
    served_ids: list[str] = field(default_factory=list)
    failed: int = 0
    server_errors: int = 0
    incomplete_streams: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def answered(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500 and status != 503:
            self.server_errors += 1
        if status != 200:
            self.failed += 1


async def run(scale: int = 1, *, postgres_url: str | None = None) -> DatabaseOutageResult:
    """``postgres_url``: the server to make a scratch database on (default: the local one)."""
    server_url = postgres_url or os.environ.get("LLAMA_GATEWAY_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    scratch = ScratchDatabases(server_url)
    target = make_url(server_url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
    with tempfile.TemporaryDirectory(prefix="database-outage-") as directory:
        try:
            database = await scratch.create(NAME)
            direct_url = scratch.url(database)
            await upgrade_database(direct_url)
            await proxy.start()
            return await _scenario(scale, Path(directory), proxy, scratch.url(database, port=proxy.port), direct_url)
        finally:
            await proxy.aclose()
            await scratch.drop_all()


async def _scenario(scale: int, directory: Path, proxy: TcpProxy, url: str, direct_url: str) -> DatabaseOutageResult:
    model = scripted_model(
        "scripted",
        price_in=Decimal("0.65"),
        price_out=Decimal("2.75"),
        max_concurrency=64,
        max_queue=256,
        reply="A short scripted answer for the outage scenario.",
        token_delay_ms=2,
    )
    admin_key = "sk-outage-" + secrets.token_urlsafe(24)
    settings: dict[str, Any] = {
        "database_url": url,
        "data_dir": str(directory / "data"),
        "key_cache_seconds": KEY_CACHE_S,
        "log_format": "json",
    }
    tally = _Tally()
    result = DatabaseOutageResult(NAME, 0, 0, 0, 0, 0)
    async with child_gateway(directory, [model], admin_key, **settings) as gateway:
        unknown_key = await _create_key(gateway, admin_key)
        await _outage_under_load(gateway, admin_key, unknown_key, proxy, CLIENTS_PER_SCALE * scale, tally, result)
        await _wait_for_rows(direct_url, tally.served_ids)
        result.spooled = int(await gateway.counter("llama_gateway_usage_rows_spooled_total"))
        result.replayed = int(await gateway.counter("llama_gateway_usage_rows_replayed_total"))
        await proxy.cut()
        crash_ids = await _serve_while_away(gateway, admin_key, CRASH_REQUESTS_PER_SCALE * scale, tally)
        result.crash_spool_bytes = _spool_bytes(directory / "data")
        await gateway.kill()
    await proxy.restore()
    async with child_gateway(directory, [model], admin_key, **settings):
        await _wait_for_rows(direct_url, tally.served_ids)
    found = await _rows_by_request(direct_url)
    served = set(tally.served_ids)
    result.crash_served = len(crash_ids)
    result.crash_rows = sum(1 for request_id in crash_ids if request_id in found)
    result.sent, result.failed, result.server_errors = tally.sent, tally.failed, tally.server_errors
    result.served = result.expected_rows = len(tally.served_ids)
    result.usage_rows = sum(found.get(request_id, 0) for request_id in served)
    result.unexpected_rows = sum(count for request_id, count in found.items() if request_id not in served)
    result.incomplete_streams = tally.incomplete_streams
    result.statuses = dict(sorted(tally.statuses.items()))
    missing = served - found.keys()
    if missing:
        result.notes.append(f"{len(missing)} requests answered 200 have no usage row, e.g. {sorted(missing)[:3]}")
    if len(served) != len(tally.served_ids):
        result.notes.append("the gateway answered two requests with the same request id")
    if result.unknown_key_refused != result.unknown_key_tries:
        result.notes.append(
            f"a key the gateway had not cached was refused with 503 {result.unknown_key_refused} of "
            f"{result.unknown_key_tries} times while the database was away"
        )
    result.notes.append(
        f"outage: {result.spooled} rows spooled, {result.replayed} replayed; crash: {result.crash_served} served "
        f"while away, {result.crash_spool_bytes} bytes spooled at the kill, {result.crash_rows} rows after the restart"
    )
    return result


async def _create_key(gateway: ChildGateway, admin_key: str) -> str:
    """A key made through the admin API and never used: the gateway has not cached it."""
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(admin_key), timeout=30) as admin:
        response = await admin.post("/admin/keys", json={"name": "never cached"})
    response.raise_for_status()
    key: str = response.json()["key"]
    return key


async def _outage_under_load(
    gateway: ChildGateway,
    key: str,
    unknown_key: str,
    proxy: TcpProxy,
    clients: int,
    tally: _Tally,
    result: DatabaseOutageResult,
) -> None:
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + UNKNOWN_KEY_TRIES)
    async with httpx.AsyncClient(
        base_url=gateway.base_url, headers=bearer(key), timeout=CLIENT_TIMEOUT_S, limits=limits
    ) as client:

        async def client_loop(number: int) -> None:
            sequence = 0
            while not stop.is_set():
                sequence += 1
                await _one_request(client, tally, stream=(number + sequence) % 2 == 0, content=f"{number}.{sequence}")

        async def timeline() -> None:
            await asyncio.sleep(WARM_UP_S)
            await proxy.cut()
            await asyncio.sleep(OUTAGE_S / 2)
            for _ in range(UNKNOWN_KEY_TRIES):
                response = await client.post(
                    "/v1/chat/completions", json=_body("who am I?"), headers=bearer(unknown_key)
                )
                tally.sent += 1
                tally.answered(response.status_code)
                result.unknown_key_tries += 1
                refused = response.status_code == 503 and "retry-after" in response.headers
                result.unknown_key_refused += refused and is_openai_error(response)
            await asyncio.sleep(OUTAGE_S / 2)
            await proxy.restore()
            await asyncio.sleep(RECOVERY_S)
            stop.set()

        await asyncio.gather(timeline(), *(client_loop(n) for n in range(clients)))


async def _serve_while_away(gateway: ChildGateway, key: str, requests: int, tally: _Tally) -> list[str]:
    """Requests served while the database is away: their rows exist only in the spool afterwards."""
    before = len(tally.served_ids)
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=CLIENT_TIMEOUT_S) as client:
        await asyncio.gather(
            *(_one_request(client, tally, stream=n % 2 == 0, content=f"while away {n}") for n in range(requests))
        )
    return tally.served_ids[before:]


def _body(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "scripted", "messages": [{"role": "user", "content": content}], "max_tokens": 12, **fields}


async def _one_request(client: httpx.AsyncClient, tally: _Tally, *, stream: bool, content: str) -> None:
    tally.sent += 1
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=_body(content))
            _count(tally, response)
            return
        body = _body(content, stream=True, stream_options={"include_usage": True})
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            _count(tally, response)
            if response.status_code == 200:
                lines = [line async for line in response.aiter_lines() if line]
                tally.incomplete_streams += not lines or lines[-1] != "data: [DONE]"
            else:
                await response.aread()
    except httpx.TransportError:
        tally.failed += 1  # no answer at all: cannot be a served request


def _count(tally: _Tally, response: httpx.Response) -> None:
    tally.answered(response.status_code)
    if response.status_code == 200:
        tally.served_ids.append(response.headers["x-request-id"])


async def _rows_by_request(database_url: str) -> dict[str, int]:
    engine = make_engine(database_url)
    try:
        query = select(UsageRecord.request_id, func.count()).group_by(UsageRecord.request_id)
        async with make_sessionmaker(engine)() as session:
            return {request_id: int(count) for request_id, count in (await session.execute(query)).all()}
    finally:
        await engine.dispose()


async def _wait_for_rows(database_url: str, request_ids: list[str]) -> None:
    """Until every request id has its row, or ``REPLAY_TIMEOUT_S`` (the result then shows what is missing)."""
    wanted = set(request_ids)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REPLAY_TIMEOUT_S):
            while True:
                if wanted <= (await _rows_by_request(database_url)).keys():
                    return
                await asyncio.sleep(0.2)


def _spool_bytes(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in (data_dir / "spool").glob("*/usage-*.jsonl"))
