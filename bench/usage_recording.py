"""What usage recording costs: requests/s through the gateway with recording on and off.

Two gateways serve the same fast scripted model (no token delay, a two-token reply) from the same
code, each in a process of its own, on one PostgreSQL database created for the run:

- on: the gateway as it ships: admission through the limiter, one usage row per request committed
  by group commit on PostgreSQL before the response's final bytes go out;
- off: ``create_app(settings, metering=NoMetering())``: no limiter, no usage rows. Authentication
  still reads keys from the same database (it is cached), so the two differ only in metering.

One client process drives both with httpx (async, ``--concurrency`` connections, non-streamed chat
completions), a fixed number of requests per run. Runs alternate on, off, off, on, ... so that a
drift in machine load hits both sides alike. Reports requests/s per run, the medians, and their
ratio (target: on/off >= 0.8), and checks that the "on" gateway committed one row per request.

Where the client, the gateways and PostgreSQL share a few cores, requests/s depends on how busy the
machine is; the CPU time each request costs the gateway process and PostgreSQL's backends (read
from /proc on Linux) does not, and says where the difference goes.

    python -m bench.usage_recording [--requests 3000] [--runs 6] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx

from gateway.settings import ModelConfig, Pricing, Settings

MODEL = "scripted"
DEFAULT_POSTGRES = os.environ.get(
    "LLAMA_GATEWAY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TOKENIZER = Path(__file__).parent.parent / "gateway" / "data" / "llama2-tokenizer" / "tokenizer.model"
STARTUP_TIMEOUT_S = 60.0
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def gateway_settings(database_url: str, port: int, admin_key: str, log_level: str) -> Settings:
    model = ModelConfig(
        name=MODEL,
        backend="scripted",
        template="llama-2",
        tokenizer=str(TOKENIZER),
        max_concurrency=256,
        max_queue=1024,
        pricing=Pricing(Decimal("0.65"), Decimal("2.75")),
        options={"reply": "Hi there.", "token_delay_ms": 0},
    )
    return Settings(
        host="127.0.0.1",
        port=port,
        database_url=database_url,
        log_level=log_level,
        initial_admin_key=admin_key,
        models=[model],
    )


def serve(args: argparse.Namespace) -> None:
    """The gateway process: as ``llama-gateway serve`` runs it, with or without metering."""
    import uvicorn

    from gateway.accounting.metering import NoMetering
    from gateway.api.app import create_app
    from gateway.observability.logs import configure_logging

    settings = gateway_settings(args.database_url, args.port, os.environ["BENCH_ADMIN_KEY"], args.log_level)
    configure_logging(settings)
    app = create_app(settings, metering=None if args.recording == "on" else NoMetering())
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False, log_config=None
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    def __init__(self, recording: str, database_url: str, admin_key: str, log_level: str, workdir: Path) -> None:
        self.recording = recording
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{recording}.log"
        command = [
            sys.executable,
            "-m",
            "bench.usage_recording",
            "serve",
            "--recording",
            recording,
            "--database-url",
            database_url,
            "--port",
            str(self.port),
            "--log-level",
            log_level,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_GATEWAY_")} | {
            "BENCH_ADMIN_KEY": admin_key
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {self.recording} gateway exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.base_url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the {self.recording} gateway did not get ready; see {self.log_path}")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Run:
    """One measured run against one gateway."""

    requests_per_s: float
    answered: int
    transport_errors: int
    """Connections that failed mid-request (the request was sent again): reported, never hidden."""
    gateway_cpu_ms: float | None
    """CPU time of the gateway process per answered request."""
    database_cpu_ms: float | None
    """CPU time of the PostgreSQL backends serving the run's database, per answered request."""


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: list[int]) -> float | None:
    """user + system CPU time of these processes (Linux /proc); None where it cannot be read."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


async def drive(base_url: str, key: str, requests: int, concurrency: int) -> tuple[float, int]:
    """Send ``requests`` chat completions over ``concurrency`` connections: (requests/s, transport errors)."""
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in remaining:
            while True:
                try:
                    response = await client.post("/v1/chat/completions", json=BODY)
                    break
                except httpx.TransportError:
                    errors += 1
            if response.status_code != 200:
                raise RuntimeError(f"request failed: {response.status_code} {response.text}")

    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as client:
        # Open the connections before the clock starts.
        await asyncio.gather(*(client.get("/health") for _ in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return requests / (time.perf_counter() - started), errors


async def _database_pids(url: str) -> list[int]:
    import asyncpg
    from sqlalchemy.engine import make_url

    database = make_url(url)
    connection = await asyncpg.connect(database.set(drivername="postgresql").render_as_string(False))
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database.database
        )
    finally:
        await connection.close()
    return [int(row["pid"]) for row in rows]


def measure(gateway: Gateway, url: str, key: str, requests: int, concurrency: int) -> Run:
    # The pools opened their connections in the warm-up; the backends serving them stay the same.
    database_pids = asyncio.run(_database_pids(url))
    gateway_before, database_before = cpu_seconds([gateway.process.pid]), cpu_seconds(database_pids)
    rate, errors = asyncio.run(drive(gateway.base_url, key, requests, concurrency))
    gateway_after, database_after = cpu_seconds([gateway.process.pid]), cpu_seconds(database_pids)

    def per_request(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else (end - start) * 1000 / requests

    return Run(
        rate, requests, errors, per_request(gateway_before, gateway_after), per_request(database_before, database_after)
    )


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database, migrated, dropped at the end."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from gateway.db import upgrade_database

    server = make_url(server_url)
    name = f"llama_gateway_bench_{uuid.uuid4().hex[:8]}"
    admin_dsn = server.set(drivername="postgresql").render_as_string(False)

    async def execute(sql: str) -> None:
        connection = await asyncpg.connect(admin_dsn)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    url = server.set(drivername="postgresql+asyncpg", database=name).render_as_string(False)
    try:
        asyncio.run(upgrade_database(url))
        yield url
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def count_rows(url: str) -> int:
    from sqlalchemy import func, select

    from gateway.db import UsageRecord, make_engine

    async def count() -> int:
        engine = make_engine(url)
        try:
            async with engine.connect() as connection:
                return int((await connection.execute(select(func.count()).select_from(UsageRecord))).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(count())


def _ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


def report(runs: dict[str, list[Run]], rows: int, answered_on: int, errors_on: int) -> None:
    on, off = (statistics.median(r.requests_per_s for r in runs[side]) for side in ("on", "off"))
    print()
    print("  (medians over the runs; CPU is per request: the gateway process, and PostgreSQL's backends)")
    print(f"  {'':<15}{'req/s':>9}{'min':>9}{'max':>9}{'gateway CPU ms':>16}{'database CPU ms':>17}")
    for side, title in (("on", "recording on"), ("off", "recording off")):
        rates = [r.requests_per_s for r in runs[side]]
        gateway_cpu = _median([r.gateway_cpu_ms for r in runs[side]])
        database_cpu = _median([r.database_cpu_ms for r in runs[side]])
        print(
            f"  {title:<15}{statistics.median(rates):9.1f}{min(rates):9.1f}{max(rates):9.1f}"
            f"{_ms(gateway_cpu):>16}{_ms(database_cpu):>17}"
        )
    print()
    print(f"  ratio on/off: {on / off:.3f}  (target >= 0.8)")
    errors = sum(r.transport_errors for side in runs.values() for r in side)
    print(f"  connections that failed mid-request (sent again): {errors}")
    print(f"  usage rows committed by the 'on' gateway: {rows} for {answered_on} answered requests")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) after the runs")
    # A request whose connection failed may or may not have been served before it was sent again.
    if not answered_on <= rows <= answered_on + errors_on:
        raise SystemExit("the 'on' gateway did not commit one usage row per request")


def run_benchmark(args: argparse.Namespace) -> None:
    print("llama-gateway usage-recording benchmark: recording on (PostgreSQL) vs. off (NoMetering)")
    print("  model        scripted, token_delay_ms 0, 2-token reply, non-streamed chat completions")
    print(f"  client       httpx async, {args.concurrency} connections, {args.requests} requests per run")
    print(f"  runs         {args.runs} per side after one warm-up each, alternating on, off, off, on, ...")
    print(f"  log level    {args.log_level} (both gateways)")
    print(f"  CPUs         {os.cpu_count()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} before start")
    sys.stdout.flush()
    admin_key = "sk-bench-" + secrets.token_urlsafe(24)
    runs: dict[str, list[Run]] = {"on": [], "off": []}
    answered_on = errors_on = 0
    with bench_database(args.postgres_url) as url, tempfile.TemporaryDirectory(prefix="llama-gateway-bench-") as work:
        gateways = {side: Gateway(side, url, admin_key, args.log_level, Path(work)) for side in ("on", "off")}
        try:
            for gateway in gateways.values():
                gateway.wait_until_ready()
            for side, gateway in gateways.items():
                warm = measure(gateway, url, admin_key, args.requests // 2, args.concurrency)
                if side == "on":
                    answered_on, errors_on = answered_on + warm.answered, errors_on + warm.transport_errors
                print(f"  warm-up {side:<3}      {warm.requests_per_s:8.1f} req/s")
            for index in range(args.runs):
                order = ("on", "off") if index % 2 == 0 else ("off", "on")
                for side in order:
                    run = measure(gateways[side], url, admin_key, args.requests, args.concurrency)
                    runs[side].append(run)
                    if side == "on":
                        answered_on, errors_on = answered_on + run.answered, errors_on + run.transport_errors
                on, off = runs["on"][-1], runs["off"][-1]
                print(
                    f"  run {index + 1}: on {on.requests_per_s:7.1f} req/s ({_ms(on.gateway_cpu_ms).strip()} ms CPU)"
                    f"   off {off.requests_per_s:7.1f} req/s ({_ms(off.gateway_cpu_ms).strip()} ms CPU)"
                )
        except BaseException:
            for gateway in gateways.values():
                print(f"--- log of the {gateway.recording} gateway (exit code {gateway.process.poll()}) ---")
                print(gateway.log_path.read_text(errors="replace")[-5000:])
            raise
        finally:
            for gateway in gateways.values():
                gateway.close()
        rows = count_rows(url)
    report(runs, rows, answered_on, errors_on)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    server = commands.add_parser("serve", help="(internal) one gateway process")
    server.add_argument("--recording", choices=["on", "off"], required=True)
    server.add_argument("--database-url", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--log-level", default="warning")
    parser.add_argument("--requests", type=int, default=3000, help="requests per measured run")
    parser.add_argument("--runs", type=int, default=6, help="measured runs per side")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--log-level", default="warning", help="the gateways' log level")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="server to create the run's database on")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
