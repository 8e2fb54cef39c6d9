"""What each step of a forwarded chat completion costs, measured one step at a time in one process.

``bench.overhead`` measures the whole request through real servers; this splits it into the
gateway's own steps, each run many times in a row on uvloop, as the server runs them:

- decoding the request body, authenticating its key (from the key cache), admission and
  settlement in the limiter (rpm, tpm, concurrency and a budget, in memory);
- the Llama-2 prompt's token ids (template and sentencepiece);
- the generation: ``Generation.events`` over the ``openai`` backend (``backends.http1``, a
  kept-alive connection) against the instant upstream (``bench.fake_upstream``, a process of its
  own), and the same request through the bare client alone;
- the response body (the choice assembled, the body built and encoded);
- the request's log line (structlog as the server configures it, JSON to a file);
- the usage row: the bare hop to a thread and back, the SQLite insert without and with its
  fsync, and ``UsageRecorder.record`` (group commit, writer thread, fsync) on a migrated database.

Per step it prints the median over rounds of wall and CPU time per call. Steps are measured
apart, so they leave out what only the whole request has (uvicorn's HTTP parsing and writes,
Litestar's routing and middleware, the thread and event-loop wake-ups between steps).

    python -m bench.request_steps [--rounds 7] [--calls 400]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import queue
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import structlog
import uvloop

from backends.base import GenerationRequest, SamplingParams
from backends.factory import create_backend
from backends.http1 import Http1Client, Target
from backends.openai_upstream import request_body
from bench.overhead import BODY, TOKENIZER, upstream
from gateway.accounting.keys import NewKey
from gateway.accounting.services import open_accounting
from gateway.accounting.usage import UsageEntry
from gateway.accounting.usage.rows import SqliteRowWriter
from gateway.api.json_bodies import decode_body
from gateway.api.openai.choice_assembly import ChoiceAssembler
from gateway.api.openai.request_bodies import ChatCompletionRequest
from gateway.api.openai.response_bodies import chat_body
from gateway.api.openai.translation import chat_prompt_ids
from gateway.db import upgrade_database
from gateway.observability.logs import configure_logging
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime, backend_config
from gateway.serving.tokenizers import load_tokenizer
from gateway.settings import ModelConfig, Pricing, Settings

SAMPLING = SamplingParams(max_tokens=32)
PRICING = Pricing(input_per_million=Decimal("0.65"), output_per_million=Decimal("2.75"))
LOG_FIELDS = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "duration_ms": 1.2,
    "key_id": "6f1c2f1e-5d0e-4a59-9d7e-0c1f3a9b8e21",
    "model": "llama-2-70b-chat",
    "endpoint": "/v1/chat/completions",
    "outcome": "completed",
    "finish_reason": "stop",
    "prompt_tokens": 38,
    "completion_tokens": 9,
    "cost_usd": "0.0000494",
    "ttft_ms": 0.6,
}

Step = Callable[[], Awaitable[object]]


async def measure(step: Step, rounds: int, calls: int) -> tuple[float, float]:
    """Median over rounds of (wall us, CPU us) per call; one round of warm-up first."""
    walls: list[float] = []
    cpus: list[float] = []
    for round_ in range(rounds + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            await step()
        if round_:
            walls.append((time.perf_counter() - wall) / calls * 1e6)
            cpus.append((time.process_time() - cpu) / calls * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def usage_entry(key_id: str) -> UsageEntry:
    now = datetime.now(UTC)
    return UsageEntry(
        request_id=f"req_{uuid.uuid4().hex}",
        key_id=key_id,
        model="llama-2-70b-chat",
        endpoint="/v1/chat/completions",
        prompt_tokens=38,
        completion_tokens=9,
        input_price_per_million=PRICING.input_per_million,
        output_price_per_million=PRICING.output_per_million,
        status="completed",
        started_at=now,
        finished_at=now,
        finish_reason="stop",
        ttft_ms=1,
    )


class _Hop:
    """The writer thread's hand-off alone: a queue to a thread, ``call_soon_threadsafe`` back."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (done := self._jobs.get()) is not None:
            self._loop.call_soon_threadsafe(done.set_result, None)

    async def __call__(self) -> None:
        done: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put(done)
        await done

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


async def run(rounds: int, calls: int) -> list[tuple[str, float, float]]:
    results: list[tuple[str, float, float]] = []

    async def step(name: str, work: Step, step_calls: int = calls) -> None:
        wall, cpu = await measure(work, rounds, step_calls)
        results.append((name, wall, cpu))
        print(f"{name:<58} {wall:8.1f} us wall {cpu:8.1f} us CPU", flush=True)

    async with AsyncExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="request-steps-")))
        url = f"sqlite+aiosqlite:///{directory / 'usage.db'}"
        await upgrade_database(url)
        accounting = await open_accounting(Settings(database_url=url))
        stack.push_async_callback(accounting.aclose)
        limits = {"rpm": 10**9, "tpm": 2 * 10**9, "max_concurrency": 10**6, "budget_usd": "1000000"}
        key, plaintext = await accounting.keys.create(msgspec.convert({"name": "steps", **limits}, NewKey))
        raw = msgspec.json.encode(BODY)

        async def decode() -> object:
            return decode_body(raw, ChatCompletionRequest)

        async def authenticate() -> object:
            return await accounting.keys.authenticate(plaintext)

        async def admit_and_settle() -> None:
            hold = await accounting.limiter.admit(key, max_tokens=70, worst_case_cost=Decimal("0.0001"))
            await hold.settle(47, Decimal("0.00005"))

        await step("decode the request body", decode)
        await step("authenticate the key (cached)", authenticate)
        await step("limits: admit and settle (memory limiter)", admit_and_settle)

        instant = await stack.enter_async_context(upstream(0))
        config = ModelConfig(
            name="llama-2-70b-chat",
            backend="openai",
            template="llama-2",
            tokenizer=str(TOKENIZER),
            pricing=PRICING,
            options={"base_url": instant + "/v1", "model": "fake-upstream"},
        )
        backend = create_backend("openai", backend_config(config))
        await backend.start()
        stack.push_async_callback(backend.stop)
        runtime = ModelRuntime(config, backend, load_tokenizer(config), None)
        body = decode_body(raw, ChatCompletionRequest)
        prompt_ids = chat_prompt_ids(body, runtime, None)

        async def prompt() -> object:
            return chat_prompt_ids(body, runtime, None)

        async def generate() -> Generation:
            generation = Generation(runtime, "req_steps", prompt_ids, SAMPLING)
            async for _ in generation.events():
                pass
            return generation

        generation = await generate()
        events = []
        async for event in Generation(runtime, "req_steps", prompt_ids, SAMPLING).events():
            events.append(event)

        async def response() -> bytes:
            assembler = ChoiceAssembler(None, logprobs=False)
            for event in events:
                assembler.feed(event)
            return msgspec.json.encode(chat_body(generation, config.name, {0: assembler.reply}))

        await step("prompt token ids (llama-2 template, sentencepiece)", prompt)
        client = Http1Client(connect_timeout_s=5.0, keepalive_s=60.0)
        target = Target.parse(instant + "/v1/completions")
        head = target.head("POST", {"Content-Type": "application/json"})
        upstream_body = msgspec.json.encode(request_body("fake-upstream", GenerationRequest("r", prompt_ids, SAMPLING)))

        async def bare_request() -> None:
            async with await client.request(target, head, upstream_body) as answer:
                await answer.read()

        await step("the upstream request alone (backends.http1)", bare_request)
        client.close()
        await step("generation: openai backend, instant upstream", generate)
        await step("response body (assembled, built, encoded)", response)

        log_path = directory / "gateway.log"
        with log_path.open("w") as log_file:
            configure_logging(Settings(log_format="json"), log_file)
            logger = structlog.get_logger("gateway.request")
            structlog.contextvars.bind_contextvars(request_id="req_steps")

            async def log_line() -> None:
                logger.info("request", **LOG_FIELDS)

            await step("request log line (JSON, to a file)", log_line)
            configure_logging(Settings(log_format="json"), io.StringIO())

        hop = _Hop()
        try:
            await step("usage row: hop to a thread and back", hop)
        finally:
            hop.close()
        for synchronous in ("NORMAL", "FULL"):
            writer = _DirectWriter(accounting.engine, synchronous)

            async def insert(writer: _DirectWriter = writer) -> None:
                writer.insert([usage_entry(key.id)])

            label = "with its fsync (FULL)" if synchronous == "FULL" else "without fsync (NORMAL)"
            await step(f"usage row: SQLite insert {label}", insert)
            writer.close()

        async def record() -> None:
            await accounting.usage.record(usage_entry(key.id))

        await step("usage row: UsageRecorder.record (thread, fsync)", record)
    return results


class _DirectWriter(SqliteRowWriter):
    """The usage writer's insert called in this thread, with the ``synchronous`` asked for."""

    def __init__(self, engine: object, synchronous: str) -> None:
        super().__init__(engine, lock_wait_s=2.0)  # type: ignore[arg-type]
        self._synchronous = synchronous
        self._own: sqlite3.Connection | None = None

    def insert(self, entries: list[UsageEntry]) -> dict[str, str]:  # type: ignore[override]
        return self._insert(entries)

    def _connect(self) -> sqlite3.Connection:
        if self._own is None:
            self._own = super()._connect()
            self._own.execute(f"PRAGMA synchronous={self._synchronous}")
        return self._own

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
        self._own = self._connection = None  # the idle writer thread must not close it again
        self._jobs.put(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; median of {args.rounds} rounds of {args.calls} calls per step", flush=True)
    uvloop.run(run(args.rounds, args.calls))


if __name__ == "__main__":
    main()
