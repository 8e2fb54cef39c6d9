"""Hostile input at volume, mixed with ordinary traffic: never a 5xx, every admitted request billed once.

Each round sends the hand-built hostile requests (invalid UTF-8, JSON nested 10,000 deep anywhere,
overflowing numbers and times, huge names, non-JSON bodies, too many messages, a body near
``max_body_bytes``) next to ordinary chat completions, streamed and not, some of them abandoned by
their clients while queued or mid-stream. Meanwhile a prober asks ``/health`` every 10 ms and keeps
its slowest answer: one heavy request must not stall the others.

    python -m bench.faults            # every scenario, this one included
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from bench.faults.live import is_openai_error, migrated_sqlite, scripted_model, serving, usage_rows
from bench.faults.report import ScenarioResult
from gateway.settings import Settings

MODEL = "hostile"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
DEEP = "[" * 10_000 + "]" * 10_000
LARGEST_CONTENT = "lorem ipsum dolor sit amet, " * 36_000  # ~1 MB body: the largest accepted


@dataclass
class HostileInputsResult(ScenarioResult):
    statuses: Counter[int] = field(default_factory=Counter)
    wrong_shape: int = 0
    """4xx answers not in their API's error shape."""
    slowest_health_ms: float = 0.0
    abandoned: int = 0
    """Requests whose clients left before any answer."""
    largest_body_health_ms: float = 0.0
    """The slowest ``/health`` while the largest accepted body alone was processed (target: 100 ms)."""

    @property
    def ok(self) -> bool:
        return super().ok and self.wrong_shape == 0


def _deep(template: str) -> bytes:
    return template.replace("%s", DEEP).encode()


def _hostile_requests() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx request arguments) for every hand-built hostile case."""
    hello = [{"role": "user", "content": "hi"}]
    chat = {"model": MODEL, "messages": hello}
    raw = [
        (CHAT, b'{"model": "hostile", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        ("/v1/completions", b'{"model": "hostile", "prompt": "\xff"}'),
        ("/admin/keys", b'{"name": "\xff"}'),
        ("/v1/predictions", b'{"version": "hostile", "input": {"prompt": "\xff"}}'),
        (CHAT, _deep('{"model": "hostile", "messages": [{"role": "user", "content": "hi"}], "tools": %s}')),
        (
            CHAT,
            _deep('{"model": "hostile", "messages": [{"role": "user", "content": "hi"}], "metadata": %s}'),
        ),
        ("/admin/keys", _deep('{"name": "deep", "metadata": {"a": %s}}')),
        ("/v1/predictions", _deep('{"version": "hostile", "input": {"prompt": %s}}')),
        ("/admin/keys", b'{"name": "rich", "budget_usd": 1e400}'),
        (CHAT, json.dumps(chat | {"messages": hello * 10_000}).encode()),
        (CHAT, json.dumps({"model": "x" * 900_000, "messages": hello}).encode()),
    ]
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", path, {"content": body, "headers": JSON}) for path, body in raw
    ]
    for fields in (
        {"rpm": 2**63},
        {"tpm": 2**63},
        {"max_concurrency": 2**63},
        {"budget_usd": "1e999"},
        {"expires_at": "9999-12-31T23:59:59-23:59"},
    ):
        cases.append(("POST", "/admin/keys", {"json": {"name": "overflow", **fields}}))
    for path in ("/v1/usage", "/admin/usage"):
        cases.append(("GET", path, {"params": {"since": "0001-01-01T00:00:00+23:59"}}))
    cases.append(("GET", "/v1/models/" + "y" * 60_000, {}))
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        cases.append(("POST", CHAT, {"content": json.dumps(chat), "headers": {"content-type": content_type}}))
    largest = {"model": MODEL, "messages": [{"role": "user", "content": LARGEST_CONTENT}]}
    cases.append(("POST", CHAT, {"content": json.dumps(largest).encode(), "headers": JSON}))
    return cases


async def _health_during_largest_body(client: httpx.AsyncClient, result: HostileInputsResult) -> float:
    """The slowest ``/health`` while the largest accepted body, alone, is being processed."""
    largest = {"model": MODEL, "messages": [{"role": "user", "content": LARGEST_CONTENT}]}
    probe = HostileInputsResult("", 0, 0, 0, 0, 0)
    stop = asyncio.Event()
    prober = asyncio.create_task(_probe_health(client, stop, probe))
    try:
        await _hostile(client, ("POST", CHAT, {"content": json.dumps(largest).encode(), "headers": JSON}), result)
    finally:
        stop.set()
        await prober
    result.server_errors += probe.server_errors
    return probe.slowest_health_ms


async def _probe_health(client: httpx.AsyncClient, stop: asyncio.Event, result: HostileInputsResult) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        response = await client.get("/health")
        result.slowest_health_ms = max(result.slowest_health_ms, (time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            result.server_errors += 1
        await asyncio.sleep(0.01)


async def _ordinary(client: httpx.AsyncClient, index: int, result: HostileInputsResult, admitted: set[str]) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"question {index}"}], "max_tokens": 20}
    result.sent += 1
    if index % 3 == 0:  # streamed; a third of those left after the first chunk
        async with client.stream("POST", CHAT, json=body | {"stream": True}) as response:
            _count(response, result)
            if response.status_code == 200:
                admitted.add(response.headers["x-request-id"])
                async for _ in response.aiter_bytes():
                    if index % 9 == 0:
                        break
        return
    if index % 5 == 1:  # abandoned while queued or generating, before any answer
        task = asyncio.create_task(client.post(CHAT, json=body))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        result.abandoned += 1
        return
    response = await client.post(CHAT, json=body)
    _count(response, result)
    if response.status_code == 200:
        admitted.add(response.headers["x-request-id"])


def _count(response: httpx.Response, result: HostileInputsResult) -> None:
    result.statuses[response.status_code] += 1
    if response.status_code < 300:
        result.served += 1
        return
    result.failed += 1
    if response.status_code >= 500 and response.status_code != 503:
        result.server_errors += 1
    elif not response.is_stream_consumed:
        return
    elif response.url.path.startswith("/v1/predictions"):
        body = response.json() if response.headers.get("content-type", "").endswith("json") else None
        if not (isinstance(body, dict) and {"title", "detail", "status"} <= set(body)):
            result.wrong_shape += 1
    elif not is_openai_error(response):
        result.wrong_shape += 1


async def run(scale: int = 1) -> HostileInputsResult:
    result = HostileInputsResult("hostile inputs", 0, 0, 0, 0, 0)
    with tempfile.TemporaryDirectory(prefix="hostile-inputs-") as directory:
        database_url = await migrated_sqlite(Path(directory))
        model = scripted_model(
            MODEL,
            price_in=Decimal("0.65"),
            price_out=Decimal("2.75"),
            max_concurrency=2,
            max_queue=64,
            token_delay_ms=5,
            context_length=8192,
        )
        settings = Settings(database_url=database_url, data_dir=directory, models=[model])
        async with serving(settings) as gateway:
            admitted: set[str] = set()
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(
                base_url=gateway.base_url,
                headers={"Authorization": f"Bearer {gateway.admin_key}"},
                timeout=120,
                limits=limits,
            ) as client:
                stop = asyncio.Event()
                prober = asyncio.create_task(_probe_health(client, stop, result))
                try:
                    for _ in range(scale):
                        work = [_hostile(client, case, result) for case in _hostile_requests()]
                        work += [_ordinary(client, i, result, admitted) for i in range(60)]
                        await asyncio.gather(*work)
                finally:
                    stop.set()
                    await prober
                result.largest_body_health_ms = await _health_during_largest_body(client, result)
            # Rows of abandoned requests are written as their requests wind down.
            await asyncio.sleep(1.0)
        rows = await usage_rows(database_url)
    result.usage_rows = len(rows)
    # Requests abandoned before any answer may or may not have been admitted; the ones that got a
    # 200 must each have exactly one row, and no request may have two.
    ids = [row.request_id for row in rows]
    result.expected_rows = len(rows) if admitted <= set(ids) and len(ids) == len(set(ids)) else len(admitted)
    result.notes.append(f"statuses {dict(sorted(result.statuses.items()))}")
    result.notes.append(
        f"{len(admitted)} answered 200, {result.abandoned} abandoned before an answer, {len(rows)} usage rows"
    )
    result.notes.append(
        f"slowest /health: {result.slowest_health_ms:.1f} ms under the mixed load (clients in the same process),"
        f" {result.largest_body_health_ms:.1f} ms while the largest accepted body alone was processed"
        " (target 100 ms)"
    )
    if result.wrong_shape:
        result.notes.append(f"{result.wrong_shape} errors not in their API's error shape")
    return result


async def _hostile(
    client: httpx.AsyncClient, case: tuple[str, str, dict[str, Any]], result: HostileInputsResult
) -> None:
    method, path, arguments = case
    result.sent += 1
    response = await client.request(method, path, **arguments)
    _count(response, result)
