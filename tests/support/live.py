"""A real gateway on loopback for tests: uvicorn serving `create_app` in a background thread."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from litestar import Litestar

from backends.base import Backend
from gateway.api.app import create_app
from gateway.settings import Settings


@dataclass(frozen=True)
class LiveGateway:
    base_url: str
    """``http://127.0.0.1:PORT`` (the OpenAI SDK wants ``base_url + "/v1"``)."""
    admin_key: str
    settings: Settings
    app: Litestar
    """The app being served, for a test to look at its state (it runs in the server's thread)."""

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_gateway(
    settings: Settings, *, backends: Mapping[str, Backend] | None = None, startup_timeout: float = 120.0
) -> Iterator[LiveGateway]:
    """Serve ``settings`` on a free loopback port until the block ends.

    The first admin key is preset, so the test knows it; the database is whatever
    ``settings.database_url`` names (use a temporary SQLite file per test module).
    """
    admin_key = settings.initial_admin_key or "sk-test-" + secrets.token_urlsafe(24)
    settings.initial_admin_key = admin_key
    settings.host = "127.0.0.1"
    settings.port = free_port()
    app = create_app(settings, backends=backends)
    # A long keep-alive: on a loaded test machine a pooled connection can sit idle past uvicorn's
    # 5 s default and be closed just as the client reuses it.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", lifespan="on", timeout_keep_alive=120
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="live-gateway", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the gateway failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the gateway did not start within {startup_timeout} s")
        time.sleep(0.02)
    httpx.get(base_url + "/health", timeout=5).raise_for_status()
    try:
        yield LiveGateway(base_url, admin_key, settings, app)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
