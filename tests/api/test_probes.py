"""``/health`` answers while the process lives; ``/ready`` only while models and database are there."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.support.databases import PostgresServer
from tests.support.gateway_process import metric_samples, sample, scripted_model
from tests.support.live import free_port, running_gateway


def test_ready_when_models_are_loaded_and_the_database_answers(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", models=[scripted_model()])
    with running_gateway(settings) as live:
        ready = httpx.get(live.base_url + "/ready")
        health = httpx.get(live.base_url + "/health")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": ["scripted"], "reasons": []}
    assert health.status_code == 200


@pytest.mark.postgres
async def test_readiness_flips_when_the_database_goes_away(postgres_server: PostgresServer) -> None:
    url = await postgres_server.create(migrated=True)
    try:
        with running_gateway(Settings(database_url=url, models=[scripted_model()])) as live:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as client:
                assert (await client.get("/ready")).status_code == 200

                await postgres_server.drop(url)  # terminates the gateway's connections too

                ready = await client.get("/ready")
                assert ready.status_code == 503
                body = ready.json()
                assert body["status"] == "unavailable"
                assert len(body["reasons"]) == 1
                assert body["reasons"][0].startswith("database: ")
                assert (await client.get("/health")).status_code == 200
                samples = metric_samples((await client.get("/metrics")).text)
                assert sample(samples, "llama_gateway_database_up") == 0
                assert sample(samples, "llama_gateway_backend_up", model="scripted") == 1
    finally:
        await postgres_server.drop(url)


@pytest.mark.redis
def test_readiness_needs_the_configured_redis(tmp_path: Path, redis_server: str) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    with running_gateway(Settings(database_url=database, redis_url=redis_server, models=[scripted_model()])) as live:
        assert httpx.get(live.base_url + "/ready").status_code == 200
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with running_gateway(Settings(database_url=database, redis_url=dead, models=[scripted_model()])) as live:
        ready = httpx.get(live.base_url + "/ready", timeout=10)
    assert ready.status_code == 503
    [reason] = ready.json()["reasons"]
    assert reason.startswith("redis: ")
