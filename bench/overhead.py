"""What the gateway itself costs: latency added and requests/s, against the upstream served direct.

One run starts, each in a process of its own:

- an instant OpenAI-style upstream (``bench.fake_upstream``) and a paced one (chunks 2 ms apart);
- the gateway in front of them (``llama-gateway serve``, the ``openai`` backend, the ``llama-2``
  template with the bundled tokenizer, usage recording on, info logs to a file), once on SQLite and
  once on PostgreSQL, each with a user key that has limits and a budget, as a paying client has;
  then on SQLite with limits in Redis, as one worker and as ``--workers N`` (N: the core count);
- wrk as the load generator (non-streamed and streamed chat completions, c = 1, 16, 64).

Each measurement runs direct, SQLite and PostgreSQL back to back, so machine noise hits all three
alike. It prints per concurrency: req/s and p50/p99 latency of each, the latency the gateway adds
at c=1, and, for streams from the paced upstream, time to first content and inter-chunk gaps.
Afterwards it counts the usage rows of each database: every request a client got whole must have
its row (requests that wrk cut off at the end of a run may add a row each, billed as they ended).

    python -m bench.overhead [--seconds 5] [--json results.json] [--no-postgres] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.faults.child_gateway import ChildGateway, child_gateway
from bench.faults.harness import ScratchDatabases, free_port
from bench.faults.live import usage_rows
from bench.stream_timing import time_streams
from bench.wrk import WrkResult, run_wrk
from gateway.db import upgrade_database
from gateway.settings import ModelConfig, Pricing

MODEL = "llama-2-70b-chat"
PACED_MODEL = "llama-2-70b-chat-paced"
PACED_INTERVAL_MS = 2.0
TOKENIZER = Path(__file__).parent.parent / "gateway" / "data" / "llama2-tokenizer" / "tokenizer.model"
BODY = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ],
    "max_tokens": 32,
}
CONCURRENCIES = (1, 16, 64)
REDIS_URL = os.environ.get("LLAMA_GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DATABASE = 13
"""A Redis database of its own: the keys the benchmark creates are new, nothing else is touched."""
POSTGRES_URL = os.environ.get(
    "LLAMA_GATEWAY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
ADMIN_KEY = "sk-bench-overhead-admin-0000000000000000"
STARTUP_TIMEOUT_S = 30.0


@dataclass
class Target:
    name: str
    base_url: str
    api_key: str | None = None
    database_url: str | None = None
    served: int = 0
    """2xx answers wrk read whole, over every run."""
    connections: int = 0
    """Connections over every run: at most this many requests were cut off when a run ended."""
    results: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    """The gateway's process (a single worker's), for reading the CPU time it spent."""

    def count(self, result: WrkResult, connections: int) -> None:
        self.served += result.ok
        self.connections += connections


@asynccontextmanager
async def upstream(chunk_interval_ms: float) -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fake_upstream",
        "--port",
        str(port),
        "--chunk-interval-ms",
        str(chunk_interval_ms),
        stdout=asyncio.subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S), httpx.AsyncClient(base_url=base_url) as client:
            while True:
                try:
                    (await client.get("/v1/models")).raise_for_status()
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield base_url
    finally:
        process.terminate()
        await process.wait()


def _models(instant_url: str, paced_url: str) -> list[ModelConfig]:
    def model(name: str, url: str) -> ModelConfig:
        return ModelConfig(
            name=name,
            backend="openai",
            template="llama-2",
            tokenizer=str(TOKENIZER),
            pricing=Pricing(input_per_million=Decimal("0.65"), output_per_million=Decimal("2.75")),
            max_concurrency=256,
            max_queue=1024,
            options={"base_url": url + "/v1", "model": "fake-upstream"},
        )

    return [model(MODEL, instant_url), model(PACED_MODEL, paced_url)]


async def _user_key(gateway: ChildGateway) -> str:
    """A key with the limits and budget a paying client has, none of them reached by the benchmark."""
    body = {
        "name": "bench",
        "rpm": 10_000_000,
        "tpm": 1_000_000_000,
        "max_concurrency": 10_000,
        "budget_usd": "1000000",
        "budget_period": "monthly",
    }
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        response = await client.post("/admin/keys", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response.raise_for_status()
    key: str = response.json()["key"]
    return key


async def _gateway(
    stack: AsyncExitStack, name: str, database_url: str, models: list[ModelConfig], **settings: Any
) -> Target:
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"overhead-{name}-")))
    gateway = await stack.enter_async_context(
        child_gateway(
            directory, models, ADMIN_KEY, database_url=database_url, data_dir=str(directory / "data"), **settings
        )
    )
    return Target(name, gateway.base_url, await _user_key(gateway), database_url, pid=gateway.process.pid)


def _sqlite_url(stack: AsyncExitStack) -> str:
    directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="overhead-db-")))
    return f"sqlite+aiosqlite:///{directory / 'usage.db'}"


async def measure(seconds: float, postgres: bool, workers: int, streams: int) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        instant = await stack.enter_async_context(upstream(0))
        paced = await stack.enter_async_context(upstream(PACED_INTERVAL_MS))
        models = _models(instant, paced)
        targets = [Target("direct", instant)]
        targets.append(await _gateway(stack, "sqlite", _sqlite_url(stack), models))
        if postgres:
            databases = ScratchDatabases(POSTGRES_URL)
            stack.push_async_callback(databases.drop_all)
            url = databases.url(await databases.create("bench_overhead"))
            await upgrade_database(url)
            targets.append(await _gateway(stack, "postgresql", url, models))
        if workers > 1:
            # Several workers share limits through Redis; one worker with the same Redis is their baseline.
            for count in (1, workers):
                redis_url = f"{REDIS_URL.rstrip('/')}/{REDIS_DATABASE}"
                name = f"sqlite+redis x{count}"
                targets.append(
                    await _gateway(stack, name, _sqlite_url(stack), models, redis_url=redis_url, workers=count)
                )

        runs: list[dict[str, Any]] = []
        for stream in (False, True):
            body = {**BODY, "stream": stream}
            for connections in CONCURRENCIES:
                for target in targets:
                    result = await run_wrk(
                        target.base_url + "/v1/chat/completions",
                        body,
                        connections=connections,
                        seconds=seconds,
                        api_key=target.api_key,
                    )
                    target.count(result, connections)
                    runs.append(
                        {"target": target.name, "stream": stream, "connections": connections, **result.as_dict()}
                    )
                    print(_run_line(runs[-1]), flush=True)

        timings: dict[str, Any] = {}
        for target in targets:
            paced_body = {**BODY, "model": PACED_MODEL if target.api_key else MODEL}
            url = (paced if target.name == "direct" else target.base_url) + "/v1/chat/completions"
            measured = await time_streams(url, paced_body, streams=streams, api_key=target.api_key)
            target.served += streams
            timings[target.name] = measured.summary()

        usage: dict[str, Any] = {}
        for target in targets:
            if target.database_url is None:
                continue
            rows = await usage_rows(target.database_url)
            statuses = Counter(row.status for row in rows)
            usage[target.name] = {
                "served": target.served,
                "rows": len(rows),
                "completed_rows": statuses.get("completed", 0),
                "statuses": dict(statuses),
                "cut_off_at_most": target.connections,
                "ok": statuses.get("completed", 0) >= target.served and len(rows) <= target.served + target.connections,
            }
    return {"runs": runs, "stream_timings": timings, "usage": usage}


def _run_line(run: dict[str, Any]) -> str:
    mode = "stream" if run["stream"] else "json"
    return (
        f"{run['target']:<11} {mode:<6} c={run['connections']:<3} {run['per_second']:>9.1f} req/s"
        f"  p50 {run['p50_us'] / 1000:7.2f} ms  p99 {run['p99_us'] / 1000:7.2f} ms  errors {run['non_2xx']}"
    )


def report(results: dict[str, Any]) -> str:
    runs = results["runs"]
    by_key = {(r["target"], r["stream"], r["connections"]): r for r in runs}
    gateways = list(dict.fromkeys(r["target"] for r in runs if r["target"] != "direct"))
    lines = ["## Requests/s and latency (wrk, chat completions, one process each)", ""]
    lines.append("| mode | c | target | req/s | p50 ms | p99 ms | p99/p50 | p50 added ms | non-2xx |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for stream in (False, True):
        for connections in CONCURRENCIES:
            direct = by_key.get(("direct", stream, connections))
            for name in ["direct", *gateways]:
                run = by_key.get((name, stream, connections))
                if run is None:
                    continue
                added = "" if name == "direct" or direct is None else f"{(run['p50_us'] - direct['p50_us']) / 1000:.2f}"
                ratio = run["p99_us"] / run["p50_us"] if run["p50_us"] else float("nan")
                lines.append(
                    f"| {'stream' if stream else 'json'} | {connections} | {name} | {run['per_second']:.0f} | "
                    f"{run['p50_us'] / 1000:.2f} | {run['p99_us'] / 1000:.2f} | {ratio:.1f} | {added} | "
                    f"{run['non_2xx'] + run['connect_errors'] + run['read_errors'] + run['timeouts']} |"
                )
    scaled = sorted({r["target"] for r in runs if r["target"].startswith("sqlite+redis x")} - {"sqlite+redis x1"})
    if scaled and any(r["target"] == "sqlite+redis x1" for r in runs):
        lines += ["", "## Workers (SQLite, limits in Redis): req/s against one worker", ""]
        for name in scaled:
            for stream in (False, True):
                for connections in CONCURRENCIES[1:]:
                    one = by_key[("sqlite+redis x1", stream, connections)]["per_second"]
                    many = by_key[(name, stream, connections)]["per_second"]
                    mode = "stream" if stream else "json"
                    lines.append(f"- {name} {mode} c={connections}: {many:.0f} vs {one:.0f} req/s = {many / one:.2f}x")
    lines += ["", f"## One stream at a time, upstream chunks {PACED_INTERVAL_MS:g} ms apart", ""]
    lines.append(
        "| target | first byte p50 ms | first content p50 ms | added | gap p50 ms | gap p99 ms | gap mean ms |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    timings = results["stream_timings"]
    direct_first = timings.get("direct", {}).get("first_content_p50_ms", float("nan"))
    for name, t in timings.items():
        added = "" if name == "direct" else f"{t['first_content_p50_ms'] - direct_first:.2f}"
        lines.append(
            f"| {name} | {t['first_byte_p50_ms']:.2f} | {t['first_content_p50_ms']:.2f} | {added} | "
            f"{t['gap_p50_ms']:.2f} | {t['gap_p99_ms']:.2f} | {t['gap_mean_ms']:.2f} |"
        )
    lines += ["", "## Usage rows afterwards", ""]
    for name, u in results["usage"].items():
        verdict = "ok" if u["ok"] else "MISSING ROWS"
        lines.append(
            f"- {name}: {u['served']} requests served whole, {u['rows']} rows ({u['statuses']}), "
            f"at most {u['cut_off_at_most']} cut off by wrk at the end of a run: {verdict}"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split(" Copyright")[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "wrk": wrk_version.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--streams", type=int, default=200, help="paced streams timed one after another")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="also serve with this many workers (needs Redis)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(measure(args.seconds, not args.no_postgres, args.workers, args.streams))
    results["machine"] = _machine()
    results["wall_s"] = round(time.monotonic() - started, 1)
    print()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not all(u["ok"] for u in results["usage"].values()) or any(
        r["non_2xx"] or r["connect_errors"] or r["timeouts"] for r in results["runs"]
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
