"""Log output: one JSON line per request with its fields; never the key, never the prompt."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from litestar import Litestar, get
from litestar.middleware import DefineMiddleware
from litestar.testing import TestClient

from gateway.accounting.usage.pricing import cost
from gateway.api.request_ids import RequestIdMiddleware, add_request_id_header
from gateway.observability.logs import REDACTED, build_formatter, litestar_logging_config, wants_json
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.request_observer import RequestObserver
from gateway.settings import Settings
from tests.support.gateway_process import (
    INPUT_PRICE,
    OUTPUT_PRICE,
    GatewayProcess,
    chat_request_body,
    gateway_process,
    scripted_model,
)
from tests.support.live import running_gateway

SECRET_PROMPT = "The launch code is PINEAPPLE-7731"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with gateway_process(tmp_path_factory.mktemp("logging"), models=[scripted_model(token_delay_ms=5)]) as served:
        yield served


def test_every_line_is_json_and_uvicorn_lines_share_the_format(gateway: GatewayProcess) -> None:
    lines = gateway.log_lines()  # raises unless every line parses
    startup = [line for line in lines if line["event"] == "Application startup complete."]
    assert startup
    assert startup[0]["logger"] == "uvicorn.error"
    for line in lines:
        assert {"timestamp", "level", "logger", "event", "pid"} <= line.keys()


def test_one_line_per_request_with_its_fields(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=chat_request_body(SECRET_PROMPT, max_tokens=4))
    assert response.status_code == 200
    usage = response.json()["usage"]
    request_id = response.headers["x-request-id"]

    line = gateway.request_line(request_id)
    assert [ln for ln in gateway.request_lines() if ln.get("request_id") == request_id] == [line]
    assert line["level"] == "info"
    assert line["logger"] == "gateway.request"
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert line["model"] == "scripted"
    assert line["endpoint"] == "/v1/chat/completions"
    assert line["outcome"] == "length"
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"] == 4
    expected_cost = cost(usage["prompt_tokens"], INPUT_PRICE) + cost(4, OUTPUT_PRICE)
    assert Decimal(line["cost_usd"]) == expected_cost
    assert line["ttft_ms"] > 0
    assert line["duration_ms"] >= line["ttft_ms"]
    key_id = line["key_id"]
    assert key_id
    assert key_id not in gateway.api_key


def test_streamed_requests_are_logged_with_their_usage(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        response = client.post("/v1/chat/completions", json=chat_request_body(SECRET_PROMPT, stream=True, max_tokens=3))
    assert response.text.endswith("data: [DONE]\n\n")
    line = gateway.request_line(response.headers["x-request-id"])
    assert line["status"] == 200
    assert line["completion_tokens"] == 3
    assert line["prompt_tokens"] > 0


def test_refused_requests_are_logged_without_secrets(gateway: GatewayProcess) -> None:
    wrong_key = "sk-wrong-" + "x" * 30
    response = httpx.post(
        gateway.base_url + "/v1/chat/completions",
        json=chat_request_body(SECRET_PROMPT),
        headers={"Authorization": f"Bearer {wrong_key}"},
    )
    assert response.status_code == 401
    line = gateway.request_line(response.headers["x-request-id"])
    assert line["status"] == 401
    assert "key_id" not in line
    assert wrong_key not in gateway.log_text()


def test_probes_are_not_logged_per_request(gateway: GatewayProcess) -> None:
    response = httpx.get(gateway.base_url + "/health")
    assert response.status_code == 200
    with gateway.client() as client:
        marker = client.get("/v1/models")  # a logged request after the probe
    gateway.request_line(marker.headers["x-request-id"])
    assert all(line["path"] not in ("/health", "/ready", "/metrics") for line in gateway.request_lines())


def test_neither_the_key_nor_the_prompt_reach_the_log(gateway: GatewayProcess) -> None:
    with gateway.client() as client:
        response = client.post("/v1/completions", json={"model": "scripted", "prompt": SECRET_PROMPT})
    gateway.request_line(response.headers["x-request-id"])
    text = gateway.log_text()
    assert gateway.api_key not in text
    assert "PINEAPPLE" not in text
    assert "Authorization" not in text
    assert "Bearer" not in text


# The mechanisms, in process: the request id on every line, redaction, content logging.


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger's output through the production JSON formatter, for the test's duration."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter(as_json=True, log_content=False))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@get("/work", sync_to_thread=False)
def work() -> str:
    structlog.get_logger("tests.work").info("through structlog", headers={"Authorization": "Bearer sk-secret-1"})
    logging.getLogger("tests.work").info("through logging %s", "too")
    structlog.get_logger("tests.work").info("content", prompt=SECRET_PROMPT, authorization="sk-secret-2")
    return "done"


def test_the_request_id_is_on_every_line_of_the_request(captured: io.StringIO) -> None:
    app = Litestar(
        [work],
        middleware=[RequestIdMiddleware, DefineMiddleware(RequestObserver, metrics=GatewayMetrics())],
        before_send=[add_request_id_header],
        logging_config=litestar_logging_config(),
    )
    with TestClient(app) as client:
        request_id = client.get("/work").headers["x-request-id"]
        other_id = client.get("/work").headers["x-request-id"]
    lines = [line for line in _json_lines(captured) if line["logger"] in ("tests.work", "gateway.request")]
    assert len(lines) == 8
    assert [line["request_id"] for line in lines] == [request_id] * 4 + [other_id] * 4
    assert lines[0]["headers"] == {"Authorization": REDACTED}
    assert lines[1]["event"] == "through logging too"
    assert lines[2]["authorization"] == REDACTED
    assert "prompt" not in lines[2]
    assert "sk-secret" not in captured.getvalue()
    assert "PINEAPPLE" not in captured.getvalue()


def test_header_lists_are_redacted_too() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.headers")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter(as_json=True, log_content=True))
    logger.addHandler(handler)
    try:
        logger.warning("asgi", extra={"headers": [(b"authorization", b"Bearer sk-x"), (b"accept", b"*/*")]})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["headers"][0][1] == REDACTED
    assert "sk-x" not in stream.getvalue()


def test_content_is_logged_only_when_enabled(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter(as_json=True, log_content=True))
    request_logger = logging.getLogger("gateway.request")
    request_logger.addHandler(handler)
    level = request_logger.level
    request_logger.setLevel(logging.INFO)
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        models=[scripted_model()],
        log_content=True,
    )
    try:
        with running_gateway(settings) as live:
            response = httpx.post(
                live.base_url + "/v1/chat/completions",
                json=chat_request_body(SECRET_PROMPT, max_tokens=3),
                headers={"Authorization": f"Bearer {live.admin_key}"},
            )
    finally:
        request_logger.removeHandler(handler)
        request_logger.setLevel(level)
    [line] = [ln for ln in _json_lines(stream) if ln.get("request_id") == response.headers["x-request-id"]]
    assert SECRET_PROMPT in line["prompt"]
    assert "[INST]" in line["prompt"]  # the prompt as the model saw it
    assert line["completion"] == "one two three"


def test_auto_format_is_json_unless_a_terminal_watches() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_json("auto", io.StringIO())
    assert not wants_json("auto", Terminal())
    assert wants_json("json", Terminal())
    assert not wants_json("console", io.StringIO())
