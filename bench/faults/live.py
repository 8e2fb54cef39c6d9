"""A gateway served inside the scenario's process, and what the scenarios ask of it.

The gateway runs under uvicorn on a thread and event loop of its own, as ``serve`` runs it, so
the scenario's clients (and any proxy in front of a service) keep their own loop. Serving in
this process lets a scenario hand the gateway engines it keeps a hand on (``CountingBackend``)
and read the app's state directly. Usage rows are read straight from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar import Litestar
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import select

from backends.base import Backend, GenerationRequest, TokenDelta
from backends.scripted import ScriptedBackend
from gateway.accounting.limits.redis_limiter import DEFAULT_PREFIX
from gateway.api.app import create_app
from gateway.db import UsageRecord, make_engine, make_sessionmaker, upgrade_database
from gateway.serving.registry import backend_config
from gateway.settings import ModelConfig, Pricing, Settings
from gateway.state import STATE_KEY, GatewayState

TOKENIZER = Path(__file__).resolve().parents[2] / "gateway" / "data" / "llama2-tokenizer" / "tokenizer.model"
STARTUP_TIMEOUT_S = 60.0
ERROR_FIELDS = {"message", "type", "param", "code"}


def scripted_model(
    name: str,
    *,
    price_in: Decimal,
    price_out: Decimal,
    max_concurrency: int,
    max_queue: int,
    **options: Any,
) -> ModelConfig:
    """A scripted model whose prompts are counted with the Llama 2 tokenizer, so prices are real."""
    return ModelConfig(
        name=name,
        backend="scripted",
        template="llama-2",
        tokenizer=str(TOKENIZER),
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        pricing=Pricing(price_in, price_out),
        options=options,
    )


@dataclass
class CountingBackend(ScriptedBackend):
    """A scripted backend that remembers how many tokens it generated for each request id."""

    generated: Counter[str] = field(default_factory=Counter)

    @classmethod
    def for_model(cls, model: ModelConfig) -> CountingBackend:
        scripted = ScriptedBackend.from_config(backend_config(model))
        return cls(
            reply=scripted.reply,
            token_delay_ms=scripted.token_delay_ms,
            end_with_eos=scripted.end_with_eos,
            max_concurrency=scripted.max_concurrency,
            context_length=scripted.context_length,
        )

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        async with contextlib.aclosing(super().generate(request)) as stream:
            async for delta in stream:
                self.generated[request.request_id] += delta.tokens
                yield delta


@dataclass(frozen=True)
class LiveGateway:
    base_url: str
    admin_key: str
    app: Litestar

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state[STATE_KEY]
        return state

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=bearer(self.admin_key), timeout=60)

    async def create_key(self, **fields: Any) -> tuple[str, str]:
        """A key made through the admin API: (id, plaintext)."""
        async with self.admin() as admin:
            response = await admin.post("/admin/keys", json=fields)
        response.raise_for_status()
        body = response.json()
        return body["id"], body["key"]

    async def update_key(self, key_id: str, **fields: Any) -> None:
        async with self.admin() as admin:
            response = await admin.patch(f"/admin/keys/{key_id}", json=fields)
        response.raise_for_status()

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of ``/metrics``, by name and label set."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:
            response = await client.get("/metrics")
        response.raise_for_status()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def is_openai_error(response: httpx.Response) -> bool:
    """Whether the body is OpenAI's error envelope: ``{"error": {message, type, param, code}}``."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and set(body["error"]) == ERROR_FIELDS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serving(settings: Settings, *, backends: Mapping[str, Backend] | None = None) -> AsyncIterator[LiveGateway]:
    """Serve ``settings`` on a free loopback port until the block ends."""
    settings.initial_admin_key = settings.initial_admin_key or "sk-faults-" + secrets.token_urlsafe(24)
    settings.host = "127.0.0.1"
    settings.port = _free_port()
    app = create_app(settings, backends=backends)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", lifespan="on", timeout_keep_alive=120
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fault-scenario-gateway", daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not server.started:
                if not thread.is_alive():
                    raise RuntimeError("the gateway failed to start; see the log above")
                await asyncio.sleep(0.02)
        yield LiveGateway(f"http://{settings.host}:{settings.port}", settings.initial_admin_key, app)
    finally:
        server.should_exit = True
        # Off this loop: shutting down may need services (a proxy) that this loop serves.
        await asyncio.to_thread(thread.join, 60)


async def migrated_sqlite(directory: Path) -> str:
    url = f"sqlite+aiosqlite:///{directory / 'gateway.db'}"
    await upgrade_database(url)
    return url


async def usage_rows(database_url: str, key_id: str | None = None) -> list[UsageRecord]:
    """The usage rows in the database (of one key), oldest first."""
    engine = make_engine(database_url)
    try:
        query = select(UsageRecord).order_by(UsageRecord.id)
        if key_id is not None:
            query = query.where(UsageRecord.key_id == key_id)
        async with make_sessionmaker(engine)() as session:
            return list((await session.scalars(query)).all())
    finally:
        await engine.dispose()


def spent(rows: list[UsageRecord]) -> Decimal:
    return sum((row.input_cost + row.output_cost for row in rows), Decimal(0))


async def forget_redis_limits(redis_url: str, key_id: str) -> None:
    """Delete a key's limiter state from Redis (a total budget's spend never expires)."""
    client = Redis.from_url(redis_url)
    try:
        async for name in client.scan_iter(match=f"{DEFAULT_PREFIX}:{{{key_id}}}:*"):
            await client.delete(name)
    finally:
        await client.aclose()


@dataclass(frozen=True)
class ExactFit:
    """What a key's budget did when set to its recorded spend plus one request's worst case."""

    probe_status: int
    """A first request, to learn the prompt's size: 200 unless the key is still held (429)."""
    fitting_status: int | None = None
    """The request that fits exactly: 200 unless reservations leaked (429)."""
    beyond_code: str | None = None
    """The request after it: ``insufficient_quota`` when the spend was settled to the cent."""

    @property
    def sent(self) -> int:
        return 1 if self.fitting_status is None else 3

    @property
    def served(self) -> int:
        """Requests admitted and answered (each has a usage row)."""
        return (self.probe_status == 200) + (self.fitting_status == 200)

    @property
    def ok(self) -> bool:
        return self.fitting_status == 200 and self.beyond_code == "insufficient_quota"


async def exact_fit(
    gateway: LiveGateway, key_id: str, key: str, database_url: str, body: dict[str, Any], model: ModelConfig
) -> ExactFit:
    """Whether the key's budget holds exactly what its usage rows say was spent, nothing more.

    Leaked reservations (or spend the limiter missed) show here: the budget is set to the spend
    in the key's rows plus the worst case of one more ``body``, which must then be admitted,
    and the request after it refused for quota. ``body`` must be non-streamed with ``max_tokens``.
    """
    pricing = model.pricing
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=bearer(key), timeout=60) as client:
        # One request first, to learn what the body's prompt counts (it is billed like any other).
        probe = await client.post("/v1/chat/completions", json=body)
        if probe.status_code != 200:
            return ExactFit(probe.status_code)
        prompt_tokens = probe.json()["usage"]["prompt_tokens"]
        worst_case = (
            prompt_tokens * pricing.input_per_million + body["max_tokens"] * pricing.output_per_million
        ) / 1_000_000
        budget = spent(await usage_rows(database_url, key_id)) + worst_case
        await gateway.update_key(key_id, budget_usd=str(budget))
        fitting = await client.post("/v1/chat/completions", json=body)
        beyond = await client.post("/v1/chat/completions", json=body)
    code = beyond.json()["error"]["code"] if is_openai_error(beyond) else None
    return ExactFit(probe.status_code, fitting.status_code, code)
