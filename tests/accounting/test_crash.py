"""SIGKILL a real ``llama-gateway serve`` under load: every response a client received completely
has its usage row committed, with the tokens the client was told.

The server runs as a subprocess from a temporary YAML config (a scripted model), on a database
migrated beforehand with ``llama-gateway db upgrade``, its first admin key preset through
``LLAMA_GATEWAY_INITIAL_ADMIN_KEY``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.gateway_process import console_script, write_config
from tests.support.gateways import bearer, usage_rows
from tests.support.live import free_port
from tests.support.model_configs import scripted_model

CLIENTS = 48
KILL_AFTER_COMPLETED = 150
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Received:
    request_id: str
    prompt_tokens: int
    completion_tokens: int


def crash_config(directory: Path, port: int, database_url: str) -> Path:
    model = scripted_model(
        "scripted",
        max_concurrency=64,
        max_queue=256,
        input_price="0.65",
        output_price="2.75",
        reply="A short scripted answer.",
        token_delay_ms=1,
        end_with_eos=False,
    )
    # A wide group-commit window: were any response to go out before its commit, the kill would catch it.
    settings = {"database_url": database_url, "log_level": "warning", "usage_flush_interval_ms": 25}
    return write_config(directory / "gateway.yaml", port, [model], **settings)


def server_log(log: Path) -> str:
    return log.read_text(errors="replace")


async def run_cli(*args: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(*console_script(), *args, env=env, stdout=out, stderr=out)


async def wait_until_ready(base_url: str, server: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            assert server.returncode is None, f"the gateway exited:\n{server_log(log)}"
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway did not get ready:\n{server_log(log)}")


async def one_response(client: httpx.AsyncClient, number: int) -> Received | None:
    """One request; its usage as the client saw it if the response arrived complete, else None."""
    body: dict[str, Any] = {
        "model": "scripted",
        "messages": [{"role": "user", "content": f"Question {number}" + "?" * (number % 7)}],
        "max_tokens": 1 + number % 24,
    }
    if number % 2 == 0:
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return None
        told = response.json()["usage"]
        return Received(response.headers["x-request-id"], told["prompt_tokens"], told["completion_tokens"])
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return None
        usage: dict[str, int] | None = None
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                assert usage is not None
                return Received(response.headers["x-request-id"], usage["prompt_tokens"], usage["completion_tokens"])
            if line.startswith("data: "):
                usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
    return None  # the stream ended without [DONE]: not received completely


async def load_then_kill(base_url: str, key: str, server: asyncio.subprocess.Process) -> list[Received]:
    """Run the clients until enough responses arrived, SIGKILL the server, and let them fail."""
    received: list[Received] = []
    killed = asyncio.Event()
    numbers = iter(range(1_000_000))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not killed.is_set():
            try:
                outcome = await one_response(client, next(numbers))
            except httpx.TransportError:
                continue  # cut off by the kill: not received completely
            if outcome is not None:
                received.append(outcome)
            if len(received) >= KILL_AFTER_COMPLETED and not killed.is_set():
                server.send_signal(signal.SIGKILL)
                killed.set()

    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, headers=bearer(key), timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CLIENTS)))
    await server.wait()
    return received


async def test_a_killed_server_lost_no_row_of_a_completed_response(db_url: str, tmp_path: Path) -> None:
    key = "sk-crash-test-" + secrets.token_urlsafe(16)
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("LLAMA_GATEWAY_")}
    env["LLAMA_GATEWAY_INITIAL_ADMIN_KEY"] = key
    config = crash_config(tmp_path, port, db_url)
    log = tmp_path / "gateway.log"

    upgrade = await run_cli("db", "upgrade", "--config", str(config), env=env, log=log)
    assert await upgrade.wait() == 0, server_log(log)
    server = await run_cli("serve", "--config", str(config), env=env, log=log)
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}", server, log)
        received = await load_then_kill(f"http://127.0.0.1:{port}", key, server)
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()

    assert server.returncode == -signal.SIGKILL
    assert len(received) >= KILL_AFTER_COMPLETED
    rows = await usage_rows(db_url)
    missing = [r.request_id for r in received if r.request_id not in rows]
    assert not missing, f"{len(missing)} of {len(received)} completed responses have no usage row"
    for response in received:
        row = rows[response.request_id]
        assert (row.prompt_tokens, row.completion_tokens) == (response.prompt_tokens, response.completion_tokens)
