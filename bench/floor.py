"""What the stack under the gateway costs a request before the gateway does anything.

``bench.overhead`` says what the gateway adds over its upstream; this says how much of that any
gateway on the same stack would pay. In one run, in alternating rounds, wrk sends chat
completions one at a time (c=1) to the instant upstream direct, to each layer of
``bench.floor_apps`` (uvicorn alone; one Litestar route; that route forwarding to the upstream
through the gateway's HTTP client; and committing one usage row with the gateway's row writer,
without and with the write-ahead log synced at each commit) and to the gateway itself (SQLite,
as in ``bench.overhead``). It prints each target's p50, what that adds over direct, and the
server's CPU time per request, medians over the rounds, and each round's p50.

    python -m bench.floor [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.faults.harness import free_port
from bench.overhead import BODY, STARTUP_TIMEOUT_S, _gateway, _models, upstream
from bench.overhead_ab import _cpu_seconds
from bench.wrk import WrkResult, run_wrk
from gateway.accounting.keys import KeyStore, NewKey
from gateway.db import make_engine, make_sessionmaker, upgrade_database

LAYERS = (
    ("uvicorn", "raw"),
    ("litestar", "litestar"),
    ("+forward", "forward"),
    ("+row, unsynced", "forward_row_unsynced"),
    ("+row", "forward_row"),
)
"""Name in the table, and the factory in ``bench.floor_apps``."""


@dataclass
class _Server:
    name: str
    base_url: str
    pid: int | None
    p50_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


@asynccontextmanager
async def _layer(name: str, factory: str, env: dict[str, str]) -> AsyncIterator[_Server]:
    port = free_port()
    # The gateway's own server settings: uvloop, httptools, no access log.
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "uvicorn", f"bench.floor_apps:{factory}", "--factory"),
        *("--port", str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log"),
        *("--log-level", "warning"),
        env={**os.environ, **env},
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S), httpx.AsyncClient(base_url=base_url) as client:
            while True:
                try:
                    (await client.post("/v1/chat/completions", json=BODY)).raise_for_status()
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield _Server(name, base_url, process.pid)
    finally:
        process.terminate()
        await process.wait()


async def _scratch_key(database_url: str) -> str:
    await upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        key, _ = await KeyStore(make_sessionmaker(engine)).create(NewKey(name="floor"))
    finally:
        await engine.dispose()
    return key.id


async def measure(rounds: int, seconds: float) -> list[_Server]:
    async with AsyncExitStack() as stack:
        instant = await stack.enter_async_context(upstream(0))
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="floor-")))
        database_url = f"sqlite+aiosqlite:///{directory / 'usage.db'}"
        env = {"FLOOR_UPSTREAM": instant, "FLOOR_DATABASE": database_url}
        env["FLOOR_KEY_ID"] = await _scratch_key(database_url)
        servers = [_Server("direct", instant, None)]
        for name, factory in LAYERS:
            servers.append(await stack.enter_async_context(_layer(name, factory, env)))
        gateway_db = f"sqlite+aiosqlite:///{directory / 'gateway.db'}"
        gateway = await _gateway(stack, "gateway", gateway_db, _models(instant, instant))
        servers.append(_Server("gateway", gateway.base_url, gateway.pid))
        key = gateway.api_key  # the layers ignore it; every target gets the same bytes
        for server in servers:  # warm-up: connections, caches, the first checkpoint
            await _one_at_a_time(server, 1, key)
        for number in range(rounds):
            order = servers if number % 2 == 0 else servers[::-1]
            for server in order:
                start = _cpu_seconds(server.pid) if server.pid else 0.0
                result = await _one_at_a_time(server, seconds, key)
                if result.errors:
                    raise RuntimeError(f"{server.name}: {result.errors} errors in {result.requests} requests")
                server.p50_ms.append(result.p50_us / 1000)
                if server.pid:
                    server.cpu_us.append(1e6 * (_cpu_seconds(server.pid) - start) / max(1, result.ok))
        return servers


async def _one_at_a_time(server: _Server, seconds: float, key: str | None) -> WrkResult:
    return await run_wrk(f"{server.base_url}/v1/chat/completions", BODY, connections=1, seconds=seconds, api_key=key)


def report(servers: list[_Server]) -> str:
    direct = statistics.median(servers[0].p50_ms)
    lines = [
        "| target | c=1 p50 ms | added over direct ms | server CPU us a request | p50 of each round ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for server in servers:
        p50 = statistics.median(server.p50_ms)
        added = "" if server is servers[0] else f"{p50 - direct:.2f}"
        cpu = f"{statistics.median(server.cpu_us):.0f}" if server.cpu_us else ""
        rounds = " ".join(f"{value:.2f}" for value in server.p50_ms)
        lines.append(f"| {server.name} | {p50:.2f} | {added} | {cpu} | {rounds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    servers = asyncio.run(measure(args.rounds, args.seconds))
    print(f"c=1, medians of {args.rounds} rounds of {args.seconds:g} s each")
    print(report(servers))


if __name__ == "__main__":
    main()
