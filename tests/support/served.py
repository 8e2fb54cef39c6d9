"""Live gateways for the API tests: real uvicorn on loopback, driven by the official OpenAI SDK.

Each test module starts one gateway with the models it needs: the embedded SmolLM2 GGUF, the tiny
random-weight Llama 2 (``llama-2`` template through llama.cpp) and scripted backends for the
gateway's own logic. Each gateway gets its own SQLite file, so a test can read the usage rows the
requests left behind.
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
from gateway.settings import ModelConfig, Settings
from tests.support.embedded import shared_data_dir
from tests.support.live import LiveGateway, running_gateway


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
