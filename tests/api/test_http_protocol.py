"""Requests that are not HTTP at all, sent to ``llama-gateway serve``: answered in OpenAI's envelope."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.gateway_process import GatewayProcess, gateway_process, wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with gateway_process(tmp_path_factory.mktemp("http-protocol")) as gateway:
        yield gateway


def raw_exchange(base_url: str, request: bytes) -> bytes:
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /\x00\x01 HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_http_gets_a_json_400(served: GatewayProcess, request_bytes: bytes) -> None:
    answer = raw_exchange(served.base_url, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_http_request"


def test_a_client_gone_before_its_body_is_logged_as_499_not_500(served: GatewayProcess) -> None:
    address = urlsplit(served.base_url)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {served.api_key}\r\nContent-Length: 1000\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(head.encode() + b'{"model": ')
    line = wait_for(
        lambda: next((r for r in served.request_lines() if r.get("path") == "/v1/chat/completions"), None),
        10,
        "no request line for the abandoned request",
    )
    assert line["status"] == 499
    assert not any(record.get("level") == "error" for record in served.log_lines())
