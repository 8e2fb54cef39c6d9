"""``Observability`` wiring: a request's usage row is committed on the event loop while that request
is the only one being served, and through the usage writer's thread while others are."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.settings import Settings
from gateway.state import STATE_KEY, GatewayState
from tests.support.gateway_process import chat_request_body, scripted_model
from tests.support.live import running_gateway

SLOW = "slow-scripted"


def test_a_lone_requests_row_is_committed_on_the_loop_and_one_among_others_through_the_writer(
    tmp_path: Path,
) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        data_dir=str(tmp_path / "data"),
        models=[scripted_model(), scripted_model(SLOW, token_delay_ms=100)],
    )
    with running_gateway(settings) as live:
        state: GatewayState = live.app.state[STATE_KEY]
        usage = state.accounting.usage
        headers = {"Authorization": f"Bearer {live.admin_key}"}
        with httpx.Client(base_url=live.openai_base_url, headers=headers, timeout=60) as client:
            assert client.post("/chat/completions", json=chat_request_body()).status_code == 200
            assert (usage.committed, usage.committed_here) == (1, 1)

            stream_body = chat_request_body(model=SLOW, stream=True, max_tokens=4)
            with client.stream("POST", "/chat/completions", json=stream_body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")  # the stream is being served...
                # ...so this request is not alone: its row goes through the writer.
                assert client.post("/chat/completions", json=chat_request_body()).status_code == 200
                assert (usage.committed, usage.committed_here) == (2, 1)
                rest = list(lines)
            assert "data: [DONE]" in rest
            # The stream ended alone: its row was committed on the loop.
            assert (usage.committed, usage.committed_here) == (3, 2)
