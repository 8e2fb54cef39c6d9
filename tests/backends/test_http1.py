"""``backends.http1``: the workers' HTTP/1.1 client against servers that answer with exact bytes."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from backends import http1
from backends.http1 import ConnectFailed, Http1Client, Http1Error, Target
from tests.support.raw_http_worker import GOOD, Worker

OK_5 = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
HEAD = {"Content-Type": "application/json"}


async def serving(worker: Worker | Callable[..., object], **tls: object) -> AsyncIterator[str]:
    handle = worker.handle if isinstance(worker, Worker) else worker
    server = await asyncio.start_server(handle, "127.0.0.1", 0, **tls)  # type: ignore[arg-type]
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()


def client(**changes: float) -> Http1Client:
    return Http1Client(
        connect_timeout_s=changes.get("connect_timeout_s", 5), keepalive_s=changes.get("keepalive_s", 60)
    )


async def fetch(http: Http1Client, url: str, body: bytes = b"{}", **options: float) -> tuple[int, bytes]:
    target = Target.parse(url)
    async with await http.request(target, target.head("POST", HEAD), body, **options) as response:
        return response.status, await response.read()


def test_a_target_is_split_once_and_writes_its_own_request_line() -> None:
    target = Target.parse("https://worker.example:8443/v1/completions?x=1")
    assert (target.host, target.port, target.tls, target.path) == ("worker.example", 8443, True, "/v1/completions?x=1")
    assert Target.parse("http://worker/v1").port == 80
    assert target.head("POST", {"Authorization": "Bearer k"}) == (
        b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: worker.example:8443\r\nAuthorization: Bearer k\r\n"
    )
    assert Target.parse("http://[::1]:80/v1").head("GET", {}) == b"GET /v1 HTTP/1.1\r\nHost: [::1]\r\n"
    with pytest.raises(ValueError, match="not an http"):
        Target.parse("ftp://worker/v1")


async def test_bodies_by_length_and_chunked_reuse_one_connection() -> None:
    worker = Worker(lambda n: OK_5 if n % 2 else GOOD)
    async for address in serving(worker):
        http = client()
        for _ in range(2):
            assert await fetch(http, f"http://{address}/v1/completions") == (200, _dechunk(GOOD))
            assert await fetch(http, f"http://{address}/v1/completions") == (200, b"hello")
        http.close()
    assert (worker.requests, worker.connections) == (4, 1)


def _dechunk(response: bytes) -> bytes:
    body = response.split(b"\r\n\r\n", 1)[1]
    out = b""
    while True:
        size_line, rest = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2 :]


async def test_a_body_that_ends_with_its_connection_is_read_whole_and_not_reused() -> None:
    worker = Worker(lambda _: b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", close_after=True)
    async for address in serving(worker):
        http = client()
        assert await fetch(http, f"http://{address}/v1") == (200, b"until the end")
        assert await fetch(http, f"http://{address}/v1") == (200, b"until the end")
        http.close()
    assert worker.connections == 2


async def test_a_connection_the_worker_closed_while_idle_is_replaced() -> None:
    worker = Worker(lambda _: OK_5, close_after=True)  # keep-alive announced, then closed anyway
    async for address in serving(worker):
        http = client()
        for _ in range(3):
            assert await fetch(http, f"http://{address}/v1") == (200, b"hello")
            await asyncio.sleep(0.05)  # the worker's close arrives while the connection is idle
        http.close()
    assert worker.connections == 3


async def test_a_connection_that_sends_bytes_while_idle_is_not_reused() -> None:
    connections = 0

    async def timing_out(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(OK_5)
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")  # unasked, left open
        await asyncio.sleep(1)
        writer.close()

    async for address in serving(timing_out):
        http = client()
        assert await fetch(http, f"http://{address}/v1") == (200, b"hello")
        await asyncio.sleep(0.1)
        assert await fetch(http, f"http://{address}/v1") == (200, b"hello")
        http.close()
    assert connections == 2


async def test_idle_connections_older_than_the_keepalive_are_not_used() -> None:
    worker = Worker(lambda _: OK_5)
    async for address in serving(worker):
        http = client(keepalive_s=0.05)
        assert await fetch(http, f"http://{address}/v1") == (200, b"hello")
        await asyncio.sleep(0.1)
        assert await fetch(http, f"http://{address}/v1") == (200, b"hello")
        http.close()
    assert worker.connections == 2


async def test_a_response_given_up_early_closes_its_connection() -> None:
    worker = Worker(lambda _: GOOD)
    async for address in serving(worker):
        http = client()
        target = Target.parse(f"http://{address}/v1")
        async with await http.request(target, target.head("POST", HEAD), b"{}") as response:
            assert await response.readany()
        assert await fetch(http, f"http://{address}/v1") == (200, _dechunk(GOOD))
        http.close()
    assert worker.connections == 2


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", "not valid HTTP", id="garbage"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", "closed the connection", id="cut-body"),
        pytest.param(b"", "closed the connection", id="no-answer"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * 100_000 + b"\r\n\r\n", "headers are longer", id="huge-headers"
        ),
        pytest.param(
            [b"HTTP/1.1 200 OK\r\nx-endless: ", *[b"a" * 30_000] * 4], "headers are longer", id="headers-without-end"
        ),
    ],
)
async def test_a_broken_answer_is_an_http1_error(answer: bytes | list[bytes], message: str) -> None:
    worker = Worker(lambda _: answer, close_after=True)
    async for address in serving(worker):
        http = client()
        with pytest.raises(Http1Error, match=message):
            await fetch(http, f"http://{address}/v1")
        http.close()


async def test_a_worker_that_stops_sending_times_out_between_reads() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await asyncio.sleep(2)
        writer.close()

    async for address in serving(silent):
        http = client()
        target = Target.parse(f"http://{address}/v1")
        response = await http.request(target, target.head("POST", HEAD), read_timeout_s=0.2)
        assert await response.readany() == b"first"
        with pytest.raises(TimeoutError):
            await response.readany()
        response.release()
        http.close()


async def test_an_unreachable_worker_is_a_connect_failure() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port}"):
        await fetch(client(), f"http://127.0.0.1:{port}/v1")


async def test_a_large_body_read_slowly_pauses_the_socket_and_arrives_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "HIGH_WATER_BYTES", 64 * 1024)
    payload = bytes(range(256)) * 8192  # 2 MiB
    worker = Worker(lambda _: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
    async for address in serving(worker):
        http = client()
        target = Target.parse(f"http://{address}/v1")
        received = b""
        async with await http.request(target, target.head("POST", HEAD)) as response:
            while piece := await response.readany():
                assert len(piece) <= 64 * 1024 + 256 * 1024  # what was buffered before the pause took hold
                received += piece
                await asyncio.sleep(0.001)
        assert received == payload
        assert await fetch(http, f"http://{address}/v1") == (200, payload)
        http.close()
    assert worker.connections == 1


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_workers_are_verified_against_the_trusted_certificates(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    worker = Worker(lambda _: OK_5)
    async for address in serving(worker, ssl=server_tls):
        url = f"https://localhost:{address.split(':')[1]}/v1"
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch(client(), url)  # not trusted: refused
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        http = client()
        assert await fetch(http, url) == (200, b"hello")
        assert await fetch(http, url) == (200, b"hello")
        http.close()
    assert worker.connections == 1  # one kept-alive connection (a refused handshake never reaches it)
