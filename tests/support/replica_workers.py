"""Remote workers for the failover tests, and the front model that spreads requests over them.

Real workers are ``llama-gateway serve`` processes (``gateway_process``) serving a scripted model;
workers that misbehave on cue (a 500, a stream cut after its first token, a connection that is
accepted and never answered) are raw HTTP servers on an event loop of their own, in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from gateway.settings import ModelConfig
from tests.support import model_configs
from tests.support.gateway_process import GatewayProcess, gateway_process, metric_samples, sample
from tests.support.paths import LLAMA2_TOKENIZER_MODEL
from tests.support.raw_http_worker import chunked, text_event

WORKER_MODEL = "worker-model"
WORKER_KEY_ENV = "FAILOVER_WORKER_KEY"
WORKER_KEY = "sk-test-failover-worker-key"
"""Every worker process's admin key, so a worker restarted on its port takes the same key."""

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextmanager
def raw_worker(handler: Handler) -> Iterator[str]:
    """Serve ``handler`` on a loopback port until the block ends; yields the base URL (``…/v1``)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    servers: list[asyncio.Server] = []

    async def open_server() -> None:
        servers.append(await asyncio.start_server(handler, "127.0.0.1", 0))
        started.set()

    thread = threading.Thread(target=loop.run_forever, name="raw-worker", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(open_server(), loop).result(timeout=10)
    started.wait(10)
    port = servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:

        async def close() -> None:
            servers[0].close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts the connection, reads what comes, answers nothing."""
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


def scripted_worker_model(reply: str) -> ModelConfig:
    return model_configs.scripted_model(WORKER_MODEL, max_concurrency=4, reply=reply)


@contextmanager
def worker_process(directory: Path, reply: str, *, port: int | None = None) -> Iterator[GatewayProcess]:
    """A worker gateway process serving ``WORKER_MODEL`` with the shared worker key."""
    directory.mkdir(parents=True, exist_ok=True)
    with gateway_process(directory, models=[scripted_worker_model(reply)], port=port, api_key=WORKER_KEY) as worker:
        yield worker


def base_url(worker: GatewayProcess) -> str:
    return worker.base_url + "/v1"


def front_model(name: str, urls: list[str], *, fallbacks: list[str] | None = None, **options: Any) -> ModelConfig:
    """A model of the front gateway forwarding to ``urls`` with the worker key (``options``:
    first_token_timeout_s, eject_after_failures, probe_interval_s, ...)."""
    return ModelConfig(
        name=name,
        backend="openai",
        template="llama-2",
        tokenizer=str(LLAMA2_TOKENIZER_MODEL),
        max_concurrency=4,
        fallbacks=fallbacks or [],
        options={"base_urls": urls, "model": WORKER_MODEL, "api_key_env": WORKER_KEY_ENV, **options},
    )


def front_metric(base: str, name: str, **labels: str) -> float:
    """One sample of a gateway's ``/metrics``."""
    exposition = httpx.get(base + "/metrics", timeout=10).text
    return sample(metric_samples(exposition), name, **labels)


def usage_count(worker: GatewayProcess) -> int:
    """Usage rows a worker process has recorded: the generations it served."""
    with contextlib.closing(sqlite3.connect(worker.db_path)) as db:
        count: int = db.execute("SELECT count(*) FROM usage_records").fetchone()[0]
    return count


class FirstTokenThenClose:
    """A worker that starts a stream, sends one token, and drops the connection."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            writer.write(chunked(text_event("Hel"), end=False))
            await writer.drain()
            await asyncio.sleep(0.2)
        finally:
            writer.close()
