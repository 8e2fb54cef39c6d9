"""Two gateway processes on one PostgreSQL database, driven by Replicate's own client: a prediction
made on one is read, listed, streamed and cancelled through the other, outlives a restart, and is
failed (not left running) when the process running it is killed. One usage row per prediction."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicate.client import Client
from replicate.stream import EventSource, ServerSentEvent
from sqlalchemy import text

from gateway.db import make_engine
from tests.support.databases import PostgresServer
from tests.support.gateway_process import REPLY, GatewayProcess, gateway_process, scripted_model, wait_for
from tests.support.live import free_port

pytestmark = pytest.mark.postgres

FAST, SLOW = "scripted", "scripted-slow"
RUNNER_TIMEOUT_S = 2.0
API_KEY = "sk-test-replicas-0123456789abcdefghijkl"


@dataclass
class Replicas:
    directory: Path
    database_url: str
    ports: tuple[int, ...]
    """Each replica's own port: a restarted replica comes back where its clients expect it."""

    def start(self, index: int) -> Any:
        """``llama-gateway serve`` as replica ``index`` (a context manager), at its own fixed port."""
        folder = self.directory / f"replica-{index}"
        folder.mkdir(exist_ok=True)
        return gateway_process(
            folder,
            models=[scripted_model(FAST), scripted_model(SLOW, token_delay_ms=30, end_with_eos=False)],
            port=self.ports[index],
            api_key=API_KEY,
            database_url=self.database_url,
            prediction_runner_timeout_s=RUNNER_TIMEOUT_S,
        )

    def usage_rows(self, request_id: str) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            engine = make_engine(self.database_url)
            try:
                async with engine.connect() as connection:
                    rows = await connection.execute(
                        text("SELECT * FROM usage_records WHERE request_id = :id"), {"id": request_id}
                    )
                    return [dict(row._mapping) for row in rows]
            finally:
                await engine.dispose()

        return asyncio.run(read())


@pytest.fixture(scope="module")
async def replicas(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replicas]:
    url = await postgres_server.create(migrated=True)
    try:
        yield Replicas(tmp_path_factory.mktemp("replicas"), url, tuple(free_port() for _ in range(4)))
    finally:
        await postgres_server.drop(url)


@pytest.fixture(scope="module")
def pair(replicas: Replicas) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    with replicas.start(0) as first, replicas.start(1) as second:
        yield first, second


def client(gateway: GatewayProcess) -> Client:
    made = Client(api_token=gateway.api_key, base_url=gateway.base_url)
    made.poll_interval = 0.05
    return made


def created_request_id(gateway: GatewayProcess, version: str, prompt_input: dict[str, Any]) -> tuple[str, str]:
    """Create through plain HTTP, for the ``x-request-id`` (the usage row's id): (prediction id, request id)."""
    response = httpx.post(
        gateway.base_url + "/v1/predictions",
        json={"version": version, "input": prompt_input},
        headers=gateway.headers,
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"], response.headers["x-request-id"]


def test_a_prediction_made_on_one_replica_is_polled_and_listed_on_the_other(
    pair: tuple[GatewayProcess, GatewayProcess], replicas: Replicas
) -> None:
    first, second = pair
    made = client(first).predictions.create(version=FAST, input={"prompt": "Hi"})
    seen = client(second).predictions.get(made.id)
    seen.wait()
    assert seen.status == "succeeded"
    assert "".join(seen.output or []) == REPLY
    assert seen.metrics is not None
    listed = client(second).predictions.list()
    assert made.id in [p.id for p in listed.results]


def test_a_prediction_running_on_one_replica_streams_through_the_other(
    pair: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = pair
    prediction_id, _ = created_request_id(first, SLOW, {"prompt": "Hi", "max_new_tokens": 40})
    decoder = EventSource.Decoder()
    events: list[ServerSentEvent] = []
    with httpx.stream(
        "GET", f"{second.base_url}/v1/predictions/{prediction_id}/stream", headers=second.headers, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if (event := decoder.decode(line)) is not None:
                events.append(event)
    assert events[-1].event == ServerSentEvent.EventType.DONE
    pieces = [e.data for e in events if e.event == ServerSentEvent.EventType.OUTPUT]
    assert [e.id for e in events[:-1]] == [str(i) for i in range(len(pieces))], "no piece lost or repeated"
    final = client(first).predictions.get(prediction_id)
    assert final.status == "succeeded"
    assert "".join(pieces) == "".join(final.output or [])
    assert final.metrics is not None
    assert final.metrics["output_token_count"] == 40


def test_a_cancel_on_the_other_replica_stops_the_run_and_bills_it_once(
    pair: tuple[GatewayProcess, GatewayProcess], replicas: Replicas
) -> None:
    first, second = pair
    prediction_id, request_id = created_request_id(first, SLOW, {"prompt": "Hi", "max_new_tokens": 4000})
    wait_for(lambda: client(second).predictions.get(prediction_id).output, 30, "no output reached the database")
    client(second).predictions.cancel(prediction_id)
    canceled = client(second).predictions.get(prediction_id)
    assert canceled.status == "canceled"
    assert canceled.metrics is not None
    assert client(first).predictions.get(prediction_id).status == "canceled"
    (row,) = replicas.usage_rows(request_id)
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] == canceled.metrics["output_token_count"] < 4000


def test_a_prediction_outlives_a_restart_of_the_replica_that_made_it(replicas: Replicas) -> None:
    with replicas.start(2) as first:
        made = client(first).predictions.create(version=FAST, input={"prompt": "Hi"})
        made.wait()
        before = httpx.get(made.urls["get"], headers=first.headers, timeout=10).json()
    with replicas.start(2) as restarted:
        after = client(restarted).predictions.get(made.id)
        assert after.status == "succeeded"
        assert httpx.get(made.urls["get"], headers=restarted.headers, timeout=10).json() == before


def test_a_prediction_of_a_killed_replica_is_failed_by_another(replicas: Replicas) -> None:
    with replicas.start(3) as survivor:
        with replicas.start(2) as doomed:
            prediction_id, _ = created_request_id(doomed, SLOW, {"prompt": "Hi", "max_new_tokens": 4000})
            wait_for(lambda: client(survivor).predictions.get(prediction_id).output, 30, "no output was stored")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
        failed = wait_for(
            lambda: (p := client(survivor).predictions.get(prediction_id)).status == "failed" and p,
            RUNNER_TIMEOUT_S * 10,
            "the killed replica's prediction was never failed",
        )
        assert failed.error is not None
        assert "stopped" in str(failed.error)
