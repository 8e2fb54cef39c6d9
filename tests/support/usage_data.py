"""Usage for the dashboard and usage-report tests: requests through a live gateway, rows written
straight to its database at chosen times, and the command line's report of them."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
from click.testing import CliRunner

from gateway.accounting.usage import UsageEntry, UsageStatus
from gateway.accounting.usage.rows import insert_entries
from gateway.cli.main import main
from gateway.db import make_engine, make_sessionmaker, upgrade_database
from tests.support.gateways import bearer
from tests.support.live import LiveGateway


def chat(live: LiveGateway, key: str, model: str, content: str = "How much is this?") -> None:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, headers=bearer(key), timeout=60)
    assert response.status_code == 200, response.text


def entry(
    request_id: str,
    key_id: str,
    model: str,
    started_at: datetime,
    *,
    status: UsageStatus = "completed",
    prompt_tokens: int = 100,
    completion_tokens: int = 10,
    prices: tuple[str, str] = ("0.65", "2.75"),
    ttft_ms: int | None = 50,
    duration_ms: int = 400,
) -> UsageEntry:
    return UsageEntry(
        request_id=request_id,
        key_id=key_id,
        model=model,
        endpoint="/v1/chat/completions",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        input_price_per_million=Decimal(prices[0]),
        output_price_per_million=Decimal(prices[1]),
        status=status,
        started_at=started_at,
        finished_at=started_at + timedelta(milliseconds=duration_ms),
        ttft_ms=ttft_ms,
    )


async def insert_usage(database_url: str, entries: Sequence[UsageEntry]) -> None:
    engine = make_engine(database_url)
    try:
        assert await insert_entries(make_sessionmaker(engine), entries) == {}
    finally:
        await engine.dispose()


def in_own_loop[T](work: Callable[[], Awaitable[T]]) -> T:
    """Run async set-up from synchronous code, in a thread with an event loop of its own: Playwright's
    synchronous API keeps a loop running in the test's thread, where no other may start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work()).result()  # type: ignore[arg-type]


def migrated_sqlite(directory: Path) -> str:
    """A SQLite database in ``directory``, migrated to head, made from synchronous code."""
    url = f"sqlite+aiosqlite:///{directory / 'gateway.db'}"
    in_own_loop(lambda: upgrade_database(url))
    return url


def cli_usage_csv(database_url: str, *args: str) -> bytes:
    """What ``llama-gateway usage report --format csv ARGS`` prints on ``database_url``, as bytes.

    Run in a thread of its own: the command starts its own event loop."""
    with tempfile.TemporaryDirectory(prefix="usage-cli-") as directory:
        config = Path(directory) / "gateway.yaml"
        config.write_text("models:\n  - {name: m, backend: scripted}\n")
        command = ["usage", "report", *args, "--format", "csv", "--config", str(config)]
        env = {"LLAMA_GATEWAY_DATABASE_URL": database_url}
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(CliRunner().invoke, main, command, env=env).result()
    assert result.exit_code == 0, result.output
    return result.stdout_bytes
