"""The least a gateway on this stack could do, one layer at a time, for ``bench.floor``.

Each is an app factory for ``uvicorn --factory`` and answers ``POST /v1/chat/completions``:

- ``raw``: a bare ASGI app with a canned reply (uvicorn alone);
- ``litestar``: one Litestar route that decodes the body and returns a canned reply;
- ``forward``: that route sending the body to the upstream through the gateway's HTTP client
  (``backends.http1``) and returning the upstream's answer;
- ``forward_row``: the same, and before answering, one usage row committed by the gateway's own
  row writer on the event loop (SQLite, the write-ahead log synced at each commit), as the
  gateway's lone requests are;
- ``forward_row_unsynced``: the same with ``PRAGMA synchronous=NORMAL`` on that connection, so
  commits are not synced (what the durability of a row costs, by difference).

Settings come from the environment: ``FLOOR_UPSTREAM`` (base URL) for the last three,
``FLOOR_DATABASE`` (a SQLite URL of a migrated database) and ``FLOOR_KEY_ID`` (a key's id there)
for the last two.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post
from litestar.types import Receive, Scope, Send

from backends.http1 import Http1Client, Target
from gateway.accounting.usage.entry import UsageEntry
from gateway.accounting.usage.rows import SqliteRowWriter
from gateway.db import make_engine

CHAT_PATH = "/v1/chat/completions"
_MESSAGE = {"role": "assistant", "content": "Hello! How can I help you today?"}
REPLY: dict[str, Any] = {
    "id": "chatcmpl-floor",
    "object": "chat.completion",
    "created": 0,
    "model": "floor",
    "choices": [
        {"index": 0, "message": _MESSAGE, "finish_reason": "stop"},
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}
_REPLY_BYTES = msgspec.json.encode(REPLY)
_JSON = {"content-type": "application/json"}
AnyRequest = Request[Any, Any, Any]


def raw() -> Any:
    """uvicorn alone: read the body, send the canned reply."""
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(_REPLY_BYTES)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = bool(message.get("more_body", False))
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send({"type": "http.response.body", "body": _REPLY_BYTES, "more_body": False})

    return app


def litestar() -> Litestar:
    @post(CHAT_PATH, status_code=200)
    async def chat(request: AnyRequest) -> Response[Any]:
        body = msgspec.json.decode(await request.body())
        return Response({**REPLY, "model": body["model"]}, headers=_JSON)

    return Litestar([chat], openapi_config=None)


def forward() -> Litestar:
    return _forwarding(with_row=False)


def forward_row() -> Litestar:
    return _forwarding(with_row=True)


def forward_row_unsynced() -> Litestar:
    return _forwarding(with_row=True, synced=False)


class _UnsyncedRowWriter(SqliteRowWriter):
    def _connect_here(self) -> sqlite3.Connection:
        connection = super()._connect_here()
        # With a write-ahead log, NORMAL syncs at checkpoints only: a commit survives the
        # process's crash but not the machine's.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection


def _forwarding(*, with_row: bool, synced: bool = True) -> Litestar:
    client = Http1Client(connect_timeout_s=5, keepalive_s=60)
    target = Target.parse(os.environ["FLOOR_UPSTREAM"] + CHAT_PATH)
    head = target.head("POST", {"Content-Type": "application/json"})
    writer_class = SqliteRowWriter if synced else _UnsyncedRowWriter
    writer = writer_class(make_engine(os.environ["FLOOR_DATABASE"]), lock_wait_s=5) if with_row else None
    key_id = os.environ.get("FLOOR_KEY_ID", "")

    @post(CHAT_PATH, status_code=200)
    async def chat(request: AnyRequest) -> Response[Any]:
        started = datetime.now(UTC)
        raw_body = await request.body()
        body = msgspec.json.decode(raw_body)
        async with await client.request(target, head, raw_body, read_timeout_s=10) as answer:
            reply = await answer.read()
        if writer is not None:
            usage = msgspec.json.decode(reply)["usage"]
            entry = UsageEntry(
                request_id="req_" + secrets.token_hex(12),
                key_id=key_id,
                model=body["model"],
                endpoint=CHAT_PATH,
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                input_price_per_million=Decimal("0.65"),
                output_price_per_million=Decimal("2.75"),
                status="completed",
                started_at=started,
                finished_at=datetime.now(UTC),
            )
            if not writer.insert_here([entry]):
                await writer.insert([entry])  # every 250 rows, behind the writer thread's checkpoint
        return Response(reply, headers=_JSON)

    async def close() -> None:
        client.close()
        if writer is not None:
            await writer.aclose()

    return Litestar([chat], openapi_config=None, on_shutdown=[close])
