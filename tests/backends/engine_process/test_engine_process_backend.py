"""An engine in its own process behaves as the same engine in the gateway's process, and survives
its process dying: generations under way fail with what they had delivered, and it starts again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from llguidance import LLMatcher

from backends.base import (
    BackendUnavailable,
    Constraint,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    ReportsProblems,
    SamplingParams,
    TokenDelta,
)
from backends.config import BackendConfig
from backends.engine_process import backend as engine_process
from backends.engine_process.backend import EngineProcessBackend, WeightsPreparingEngineProcess
from backends.engine_process.server import ForwardingHandler
from backends.engine_process.wire import Log, read_from_engine
from backends.factory import BackendKind, create_backend
from backends.llamacpp.backend import LlamaCppBackend
from backends.scripted import ScriptedBackend
from tests.backends.llamacpp.backend_support import embedded_config
from tests.support.embedded import shared_data_dir
from tests.support.processes import process_is_gone

REPLY = "one two three four five six seven eight"


def scripted_config(*, token_delay_ms: float = 0.0, max_concurrency: int = 4, **options: object) -> BackendConfig:
    return BackendConfig(
        "scripted-apart",
        context_length=4096,
        max_concurrency=max_concurrency,
        options={"reply": REPLY, "token_delay_ms": token_delay_ms, "end_with_eos": False, "engine_process": True}
        | options,
    )


def request(max_tokens: int = 5, request_id: str = "r", **fields: object) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens, temperature=0), **fields)  # type: ignore[arg-type]


async def collect(
    backend: EngineProcessBackend | ScriptedBackend | LlamaCppBackend, req: GenerationRequest
) -> list[TokenDelta]:
    return [delta async for delta in backend.generate(req)]


@contextlib.asynccontextmanager
async def started(
    config: BackendConfig, kind: BackendKind = "scripted", weights_dir: Path | None = None
) -> AsyncIterator[EngineProcessBackend]:
    backend = create_backend(kind, config, weights_dir=weights_dir)
    assert isinstance(backend, EngineProcessBackend)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def wait_until_serving(backend: EngineProcessBackend, old_pid: int) -> None:
    async with asyncio.timeout(30):
        while backend.problem() is not None or backend.pid in (None, old_pid):  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.05)


async def drain_into(stream: AsyncIterator[TokenDelta], deltas: list[TokenDelta]) -> None:
    async for delta in stream:
        deltas.append(delta)


async def test_the_option_puts_the_engine_in_its_own_process() -> None:
    async with started(scripted_config()) as backend:
        assert backend.pid is not None
        assert backend.pid != os.getpid()
        assert backend.problem() is None
        assert isinstance(backend, ReportsProblems)


async def test_deltas_arrive_as_the_engine_made_them() -> None:
    in_process = ScriptedBackend(reply=REPLY, end_with_eos=False)
    async with started(scripted_config()) as backend:
        for max_tokens in (1, 3, 8, 20):
            assert await collect(backend, request(max_tokens)) == await collect(in_process, request(max_tokens))


async def test_generations_run_side_by_side_on_one_socket() -> None:
    async with started(scripted_config(token_delay_ms=5)) as backend:
        results = await asyncio.gather(*(collect(backend, request(4 + n, f"r{n}")) for n in range(8)))
    for n, deltas in enumerate(results):
        assert sum(d.tokens for d in deltas) == 4 + n
        assert deltas[-1].finish_reason == "length"


async def test_closing_a_generation_stops_it_in_the_engine_at_once() -> None:
    async with started(scripted_config(token_delay_ms=20, max_concurrency=1)) as backend:
        stream = backend.generate(request(10_000))
        await anext(stream)
        await stream.aclose()
        # The engine forgot it: a generation started after it runs alone, at full pace.
        started_at = asyncio.get_running_loop().time()
        deltas = await collect(backend, request(3))
        assert sum(d.tokens for d in deltas) == 3
        assert asyncio.get_running_loop().time() - started_at < 5


async def test_a_start_failure_says_what_the_engine_said(tmp_path: Path) -> None:
    config = BackendConfig("broken", str(tmp_path / "missing.gguf"), 512, 1, {"n_ctx": 512, "engine_process": True})
    backend = create_backend("llamacpp", config)
    assert isinstance(backend, WeightsPreparingEngineProcess)
    with pytest.raises(BackendUnavailable, match=r"missing\.gguf"):
        backend.preflight()  # answered by a short-lived process, as the engine would
    with pytest.raises(BackendUnavailable, match=r"missing\.gguf"):
        await backend.start()
    assert backend.pid is None


async def test_a_dead_engine_fails_its_generations_and_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_process, "RESTART_PAUSES", (0.2,))
    async with started(scripted_config(token_delay_ms=10)) as backend:
        pid = backend.pid
        assert pid is not None
        streams = [backend.generate(request(10_000, f"r{n}")) for n in range(3)]
        received = [[await anext(stream)] for stream in streams]
        os.kill(pid, signal.SIGKILL)
        for stream, deltas in zip(streams, received, strict=True):
            with pytest.raises(GenerationFailed, match="SIGKILL"):
                await drain_into(stream, deltas)
            assert sum(d.tokens for d in deltas) >= 1  # what was delivered stays delivered
        assert "SIGKILL" in (backend.problem() or "")
        with pytest.raises(BackendUnavailable, match="starting it again"):
            await collect(backend, request())
        await wait_until_serving(backend, pid)
        assert process_is_gone(pid)
        deltas = await collect(backend, request(4))
        assert sum(d.tokens for d in deltas) == 4


async def test_stop_ends_the_process_and_a_stopped_backend_refuses() -> None:
    async with started(scripted_config()) as backend:
        pid = backend.pid
        assert pid is not None
    assert backend.pid is None
    assert process_is_gone(pid)
    assert backend.problem() is not None
    with pytest.raises(BackendUnavailable):
        await collect(backend, request())


async def test_stop_ends_the_generations_still_running() -> None:
    async with started(scripted_config(token_delay_ms=10)) as backend:
        stream = backend.generate(request(10_000))
        await anext(stream)
        await asyncio.wait_for(backend.stop(), 10)
        with pytest.raises(GenerationFailed):
            async for _ in stream:
                pass


async def test_the_engine_exits_when_the_gateway_dies() -> None:
    script = (
        "import asyncio, os, sys\n"
        "from backends.config import BackendConfig\n"
        "from backends.factory import BackendKind, create_backend\n"
        "async def main():\n"
        "    b = create_backend('scripted', BackendConfig('m', options={'engine_process': True}))\n"
        "    await b.start()\n"
        "    print(b.pid, flush=True)\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[3]
    )
    out, _ = await gateway.communicate()
    engine_pid = int(out.split()[0])
    async with asyncio.timeout(10):
        while not process_is_gone(engine_pid):  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.05)


# The real engine: llama.cpp on the bundled model, in its process and in this one.


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_data_dir(tmp_path_factory) / "weights"


async def test_llama_cpp_apart_samples_the_same_tokens_as_in_process(weights_dir: Path) -> None:
    config = embedded_config()
    apart = BackendConfig(
        config.name, config.path, config.context_length, 1, {**config.options, "engine_process": True}
    )
    prompt = [1, 9690, 198, 2683, 346, 1096, 47, 2]
    greedy = GenerationRequest("g", prompt, SamplingParams(max_tokens=12, temperature=0), logprobs=2)
    seeded = GenerationRequest("s", prompt, SamplingParams(max_tokens=12, temperature=0.9, seed=7))
    local = LlamaCppBackend(config, weights_dir=weights_dir)
    await local.start()
    try:
        expected = [await collect(local, greedy), await collect(local, seeded)]
    finally:
        await local.stop()
    async with started(apart, "llamacpp", weights_dir) as backend:
        assert backend.capabilities.supports_logprobs
        assert [await collect(backend, greedy), await collect(backend, seeded)] == expected


async def test_llama_cpp_apart_refuses_a_grammar_with_the_same_error(weights_dir: Path) -> None:
    config = embedded_config()
    apart = BackendConfig(
        config.name, config.path, config.context_length, 1, {**config.options, "engine_process": True}
    )
    grammar = LLMatcher.grammar_from_regex("[a&&b]")
    impossible = request(5, constraint=Constraint(grammar, {"guided_regex": "[a&&b]"}, param="guided_regex"))
    async with started(apart, "llamacpp", weights_dir) as backend:
        with pytest.raises(GrammarRejected):
            await collect(backend, impossible)


async def test_the_engines_log_records_come_out_through_the_gateways_logging(
    weights_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the engine is started with the gateway's level
    config = embedded_config()
    apart = BackendConfig(
        config.name, config.path, config.context_length, 1, {**config.options, "engine_process": True}
    )
    async with started(apart, "llamacpp", weights_dir) as backend:
        pid = backend.pid
    relayed = [record for record in caplog.records if getattr(record, "engine_pid", None) == pid]
    # The model's load is logged by the engine's backend, before the engine said it was ready.
    assert any(record.name == "backends.llamacpp.backend" for record in relayed), caplog.text
    assert all(record.levelno >= logging.INFO for record in relayed)


async def test_log_records_go_to_the_gateway_once_connected_from_any_thread_and_to_stderr_otherwise() -> None:
    fallback = logging.handlers.BufferingHandler(capacity=100)
    forwarding = ForwardingHandler(fallback)
    log = logging.getLogger("tests.engine_process.forwarding")
    log.propagate = False
    log.addHandler(forwarding)
    try:
        log.warning("before the connection")
        ours, theirs = socket.socketpair()
        with ours, theirs:
            _, writer = await asyncio.open_unix_connection(sock=ours.dup())
            reader, _ = await asyncio.open_unix_connection(sock=theirs.dup())
            forwarding.attach(writer)
            log.error("from the loop: %d", 1)
            await asyncio.to_thread(log.warning, "from a thread")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("with its traceback")
            forwarding.detach()
            log.warning("after the connection")
            received = [await read_from_engine(reader) for _ in range(3)]
            writer.close()
    finally:
        log.removeHandler(forwarding)
    assert [record.getMessage() for record in fallback.buffer] == ["before the connection", "after the connection"]
    assert [(m.level, m.logger, m.message.splitlines()[0]) for m in received if isinstance(m, Log)] == [
        (logging.ERROR, "tests.engine_process.forwarding", "from the loop: 1"),
        (logging.WARNING, "tests.engine_process.forwarding", "from a thread"),
        (logging.ERROR, "tests.engine_process.forwarding", "with its traceback"),
    ]
    last = received[-1]
    assert isinstance(last, Log)
    assert "ValueError: boom" in last.message
