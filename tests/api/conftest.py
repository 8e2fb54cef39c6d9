"""Live gateways for the API tests: real uvicorn on loopback, driven by the official OpenAI SDK.

Each test module starts one gateway (module-scoped fixture) with the models it needs: the
embedded SmolLM2 GGUF, the tiny random-weight Llama 2 (``llama-2`` template through llama.cpp)
and scripted backends for the gateway's own logic. Each gateway gets its own SQLite file, so a
test can read the usage rows the requests left behind.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest

from backends.base import Backend
from gateway.settings import ModelConfig, RequestDefaults, Settings, load_settings
from tests.conftest import PostgresServer
from tests.embedded import shared_data_dir
from tests.live import LiveGateway, running_gateway

LLAMA2_TOKENIZER_MODEL = Path(__file__).parents[2] / "gateway" / "data" / "llama2-tokenizer" / "tokenizer.model"
EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-llama-2"
# Small contexts keep each llama.cpp context's KV cache (and start-up) small.
TEST_CONTEXT = 2048


def embedded_model(**changes: Any) -> ModelConfig:
    """The bundled SmolLM2 model exactly as the zero-config gateway serves it, with a smaller context."""
    model = load_settings(environ={}).models[0]
    model = replace_struct(model, context_length=TEST_CONTEXT, options=model.options | {"n_ctx": TEST_CONTEXT})
    return replace_struct(model, **changes)


def tiny_llama2_model(model_dir: Path, name: str = TINY, **changes: Any) -> ModelConfig:
    """The tiny random Llama 2 as a llama.cpp model with the ``llama-2`` template."""
    model = ModelConfig(
        name=name,
        backend="llamacpp",
        path=str(model_dir / "model.gguf"),
        template="llama-2",
        context_length=512,
        options={"n_ctx": 512},
    )
    return replace_struct(model, **changes)


def scripted_model(
    name: str, *, max_concurrency: int = 1, max_queue: int = 32, context_length: int = 4096, **options: Any
) -> ModelConfig:
    """A scripted backend (``options``: reply, token_delay_ms, end_with_eos), counted with the Llama 2
    tokenizer."""
    return ModelConfig(
        name=name,
        backend="scripted",
        template="llama-2",
        tokenizer=str(LLAMA2_TOKENIZER_MODEL),
        context_length=context_length,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        options=options,
    )


def with_system_prompt(model: ModelConfig, system_prompt: str) -> ModelConfig:
    return replace_struct(model, defaults=RequestDefaults(system_prompt=system_prompt))


def replace_struct(model: ModelConfig, **changes: Any) -> ModelConfig:
    return msgspec.structs.replace(model, **changes)


@dataclass(frozen=True)
class Served:
    """A running gateway, its database file, and clients for it."""

    live: LiveGateway
    db_path: Path

    @property
    def base_url(self) -> str:
        return self.live.openai_base_url

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.live.admin_key}"}

    def client(self, **options: Any) -> openai.OpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 120)
        options.setdefault("api_key", self.live.admin_key)
        return openai.OpenAI(base_url=self.base_url, **options)

    def async_client(self, **options: Any) -> openai.AsyncOpenAI:
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 120)
        options.setdefault("api_key", self.live.admin_key)
        return openai.AsyncOpenAI(base_url=self.base_url, **options)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120)

    def usage_rows(self, where: str = "1 = 1", *params: Any) -> list[dict[str, Any]]:
        """Usage rows matching an SQL condition, oldest first."""
        with closing(sqlite3.connect(self.db_path)) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(f"SELECT * FROM usage_records WHERE {where} ORDER BY id", params).fetchall()
        return [dict(row) for row in rows]

    def usage_row(self, request_id: str, *, wait_s: float = 5.0) -> dict[str, Any]:
        """The usage row of one request, waiting briefly for rows written after the response."""
        deadline = time.monotonic() + wait_s
        while True:
            rows = self.usage_rows("request_id = ?", request_id)
            if rows:
                return rows[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage row for request {request_id}")
            time.sleep(0.02)


@contextmanager
def serve(
    tmp_path_factory: pytest.TempPathFactory,
    models: list[ModelConfig],
    *,
    backends: Mapping[str, Backend] | None = None,
    **settings_fields: Any,
) -> Iterator[Served]:
    """Serve ``models``; ``backends`` are engines the test keeps a hand on, by model name."""
    db_path = tmp_path_factory.mktemp("gateway-db") / "gateway.db"
    settings_fields.setdefault("data_dir", str(shared_data_dir(tmp_path_factory)))
    settings = Settings(database_url=f"sqlite+aiosqlite:///{db_path}", models=models, **settings_fields)
    with running_gateway(settings, backends=backends) as live:
        yield Served(live, db_path)


def sse_payloads(body: bytes) -> list[Any]:
    """The ``data:`` payloads of a complete SSE body, checking its framing; ``[DONE]`` stays a string."""
    assert body.endswith(b"\n\n"), body[-200:]
    payloads: list[Any] = []
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, event
        data = event.removeprefix(b"data: ")
        payloads.append(data.decode() if data == b"[DONE]" else msgspec.json.decode(data))
    return payloads


# Each module defines its own ``served`` gateway; these clients follow whichever one it is.
@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with served.client() as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.http() as client:
        yield client


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_server(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The database server a module's gateway runs on: none (a SQLite file), then PostgreSQL."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server
    return None
