from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gateway.accounting.usage import UsageEntry
from gateway.accounting.usage.rows import insert_entries
from gateway.cli.main import main
from gateway.db import is_sqlite, make_engine, make_sessionmaker


class Cli:
    """Runs ``llama-gateway`` in a thread: its commands start their own event loops."""

    def __init__(self, config: Path, database_url: str) -> None:
        self.config = config
        self.database_url = database_url

    async def __call__(self, *args: str, ok: bool = True) -> Result:
        # A wide "terminal", so that tables do not abbreviate the values the tests look for.
        env = {"LLAMA_GATEWAY_DATABASE_URL": self.database_url, "COLUMNS": "200"}
        result = await asyncio.to_thread(CliRunner().invoke, main, [*args, "--config", str(self.config)], env=env)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    async def json(self, *args: str) -> Any:
        return json.loads((await self(*args, "--format", "json")).output)


@pytest.fixture
def cli(db_url: str, tmp_path: Path) -> Cli:
    config = tmp_path / "gateway.yaml"
    # The file names another database: the environment variable must win over it.
    config.write_text(
        f"database_url: sqlite+aiosqlite:///{tmp_path}/not-this-one.db\nmodels:\n  - {{name: m, backend: scripted}}\n"
    )
    return Cli(config, db_url)


async def test_postgres_needs_db_upgrade_first_and_sqlite_does_not(cli: Cli) -> None:
    if is_sqlite(cli.database_url):
        assert await cli.json("keys", "list") == []
        return
    refused = await cli("keys", "list", ok=False)
    assert refused.exit_code == 1
    assert "llama-gateway db upgrade" in refused.output
    upgraded = await cli("db", "upgrade")
    assert "is at migration" in upgraded.output
    assert await cli.json("keys", "list") == []


async def test_key_lifecycle(cli: Cli) -> None:
    await cli("db", "upgrade")
    created = json.loads(
        (
            await cli(
                "keys", "create", "--name", "ci", "--owner", "team-a", "--models", "m, other",
                "--rpm", "5", "--tpm", "1000", "--max-concurrency", "2", "--budget", "2.5",
                "--budget-period", "monthly", "--expires", "30d", "--metadata", "env=prod", "--json",
            )
        ).output
    )  # fmt: skip
    assert created["key"].startswith("sk-")
    assert created["prefix"] == f"{created['key'][:7]}…{created['key'][-4:]}"
    assert (created["models"], created["rpm"], created["budget_usd"]) == ("m,other", 5, "2.50")
    assert created["metadata"] == {"env": "prod"}
    key_id = created["id"]

    human = await cli("keys", "create", "--name", "admin", "--scope", "admin")
    assert "only time the key is shown" in human.output
    assert "sk-" in human.output

    listed = await cli.json("keys", "list")
    assert [k["name"] for k in listed] == ["ci", "admin"]
    assert all("key" not in k for k in listed)
    rows = list(csv.DictReader(io.StringIO((await cli("keys", "list", "--format", "csv")).output)))
    assert rows[0]["id"] == key_id
    assert rows[0]["budget_period"] == "monthly"
    table = (await cli("keys", "list")).output
    assert "ci" in table
    assert key_id[:8] in table
    assert key_id not in table  # tables show the beginning of ids; commands accept it
    assert (await cli.json("keys", "show", key_id[:8]))["id"] == key_id

    shown = await cli.json("keys", "show", key_id)
    assert shown["status"] == "active"
    assert shown["owner"] == "team-a"

    updated = await cli.json("keys", "update", key_id, "--rpm", "none", "--budget", "10", "--models", "all")
    assert (updated["rpm"], updated["tpm"], updated["budget_usd"], updated["models"]) == (None, 1000, "10.00", "all")

    revoked = await cli("keys", "revoke", key_id)
    assert "Revoked" in revoked.output
    assert (await cli.json("keys", "show", key_id))["status"] == "revoked"
    assert [k["name"] for k in await cli.json("keys", "list")] == ["admin"]
    assert [k["name"] for k in await cli.json("keys", "list", "--all")] == ["ci", "admin"]


async def test_mistakes_get_plain_messages(cli: Cli) -> None:
    await cli("db", "upgrade")
    missing = await cli("keys", "show", "no-such-id", ok=False)
    assert (missing.exit_code, "no API key has id 'no-such-id'" in missing.output) == (1, True)
    nothing = await cli("keys", "update", "no-such-id", ok=False)
    assert nothing.exit_code == 2
    bad = await cli("keys", "create", "--name", "x", "--rpm", "0", ok=False)
    assert bad.exit_code == 2
    assert "--rpm" in bad.output


async def test_usage_report(cli: Cli) -> None:
    await cli("db", "upgrade")
    key_id = json.loads((await cli("keys", "create", "--name", "app", "--json")).output)["id"]
    day = datetime(2025, 6, 1, 12, tzinfo=UTC)
    entries = [
        UsageEntry(
            request_id=f"r{n}",
            key_id=key_id,
            model="llama-2-70b" if n % 2 else "smollm2",
            endpoint="/v1/chat/completions",
            prompt_tokens=1000,
            completion_tokens=100,
            input_price_per_million=Decimal("0.65"),
            output_price_per_million=Decimal("2.75"),
            status="completed",
            started_at=day + timedelta(days=n // 2),
            finished_at=day + timedelta(days=n // 2, seconds=1),
        )
        for n in range(4)
    ]
    engine = make_engine(cli.database_url)
    try:
        assert await insert_entries(make_sessionmaker(engine), entries) == {}
    finally:
        await engine.dispose()

    report = await cli.json("usage", "report")
    assert report["rows"][0]["label"] == "app"
    assert report["total"]["requests"] == 4
    assert report["total"]["total_cost_usd"] == "0.0037000000"

    by_model = await cli.json("usage", "report", "--group-by", "model", "--since", "2025-06-02")
    assert [(r["group"], r["requests"]) for r in by_model["rows"]] == [("llama-2-70b", 1), ("smollm2", 1)]

    table = (await cli("usage", "report", "--group-by", "day", "--key", key_id, "--until", "2025-06-02")).output
    assert "2025-06-01" in table
    assert "2025-06-02" not in table

    rows = list(csv.DictReader(io.StringIO((await cli("usage", "report", "--format", "csv")).output)))
    assert rows[-1]["key"] == "total"
    assert rows[-1]["total_usd"] == "0.0037"
