"""SIGTERM during a live stream: the stream finishes, new work is refused, usage is kept, exit 0."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway_process import GatewayProcess, chat_request_body, gateway_process, scripted_model, wait_for
from tests.support.processes import process_is_gone

TWENTY_WORDS = " ".join(f"w{i}" for i in range(20))


class StreamReader(threading.Thread):
    """Reads one streamed chat completion to its end in the background."""

    def __init__(self, gateway: GatewayProcess, **fields: Any) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.fields = fields
        self.first_chunk = threading.Event()
        self.body = b""
        self.request_id = ""
        self.status = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                self.gateway.client() as client,
                client.stream(
                    "POST", "/v1/chat/completions", json=chat_request_body(stream=True, **self.fields)
                ) as response,
            ):
                self.status = response.status_code
                self.request_id = response.headers["x-request-id"]
                for chunk in response.iter_bytes():
                    self.body += chunk
                    self.first_chunk.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.first_chunk.set()


def _refused_while_draining(gateway: GatewayProcess) -> None:
    def not_ready() -> httpx.Response | None:
        response = httpx.get(gateway.base_url + "/ready", timeout=5)
        return response if response.status_code == 503 else None

    ready = wait_for(not_ready, 5, "/ready did not turn 503 after SIGTERM")
    assert "shutting down" in ready.json()["reasons"]
    assert httpx.get(gateway.base_url + "/health", timeout=5).status_code == 200

    with gateway.client() as client:
        refused = client.post("/v1/chat/completions", json=chat_request_body())
    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["connection"] == "close"
    assert refused.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize(
    ("workers", "engine_process"), [(1, False), (1, True), pytest.param(2, False, marks=pytest.mark.redis)]
)
def test_sigterm_during_a_stream_drains_and_exits_zero(
    tmp_path: Path, workers: int, engine_process: bool, request: pytest.FixtureRequest
) -> None:
    # With several workers (which share limits through Redis), SIGTERM goes to the parent, which
    # passes it on to each worker. An engine in its own process keeps serving until the drain ends.
    shared = {"redis_url": request.getfixturevalue("redis_server")} if workers > 1 else {}
    model = scripted_model(reply=TWENTY_WORDS, token_delay_ms=100, engine_process=engine_process)
    with gateway_process(tmp_path, models=[model], drain_seconds=20, workers=workers, **shared) as gateway:
        stream = StreamReader(gateway, max_tokens=200)
        stream.start()
        assert stream.first_chunk.wait(10)
        assert stream.error is None

        gateway.terminate()
        _refused_while_draining(gateway)

        stream.join(timeout=30)
        assert stream.error is None
        assert stream.status == 200
        assert stream.body.endswith(b"data: [DONE]\n\n")
        assert b"w19" in stream.body
        assert gateway.wait_exit(timeout=30) == 0

        if engine_process:
            engine_pids = [int(pid) for pid in re.findall(r"engine process (\d+) serves model", gateway.log_text())]
            assert len(engine_pids) == 1, gateway.log_text()
            assert process_is_gone(engine_pids[0])

        row = gateway.usage_row(stream.request_id)
        assert row is not None
        assert row["status"] == "completed"
        assert row["completion_tokens"] == 20
        events = [line["event"] for line in gateway.log_lines()]
        assert "draining" in events
        assert "drained" in events
        refused_lines = [line for line in gateway.request_lines() if line["status"] == 503]
        assert refused_lines
        assert all(line["path"] == "/v1/chat/completions" for line in refused_lines)


@pytest.mark.timeout(120)
def test_a_stream_outlasting_the_drain_is_cut_and_its_usage_kept(tmp_path: Path) -> None:
    model = scripted_model(token_delay_ms=100, end_with_eos=False)
    with gateway_process(tmp_path, models=[model], drain_seconds=1) as gateway:
        stream = StreamReader(gateway, max_tokens=1000)  # 100 s: far beyond the drain
        stream.start()
        assert stream.first_chunk.wait(10)

        gateway.terminate()
        assert gateway.wait_exit(timeout=60) == 0
        stream.join(timeout=30)

        assert not stream.body.endswith(b"data: [DONE]\n\n")
        row = gateway.usage_row(stream.request_id)
        assert row is not None
        assert row["status"] == "cancelled"
        assert 0 < row["completion_tokens"] < 1000
        assert any(line["event"] == "drain deadline passed" for line in gateway.log_lines())
