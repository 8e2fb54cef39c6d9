"""`EngineProcessBackend`: a local engine run in a process of its own, seen as a backend.

The gateway's process then never runs a forward pass nor the engine's Python (sampling,
grammar masks, detokenizing), so they do not compete with HTTP for one interpreter. Every
generation of the model shares one Unix socket pair to that process (`wire` frames).

When the process dies, each generation under way fails with `GenerationFailed` (the tokens it
had already delivered stay billed by the gateway) and the process is started again, with a
growing pause between tries; meanwhile new generations get `BackendUnavailable` and `problem`
says why, for ``/ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator
from pathlib import Path

from backends.base import (
    Backend,
    BackendCapabilities,
    BackendError,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    Preflight,
    PreparesWeights,
    TokenDelta,
    WeightsProgress,
)
from backends.config import BackendConfig
from backends.engine_process.wire import (
    PREFLIGHT_REFUSED,
    Cancel,
    Delta,
    Ended,
    EngineSpec,
    Failed,
    FrameError,
    FromEngine,
    Generate,
    Log,
    Ready,
    Shutdown,
    StartFailed,
    ToEngine,
    encode_spec,
    failure_error,
    frame,
    read_from_engine,
)

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 30.0
"""How long a stopping engine may take to unload before it is killed."""
RESTART_PAUSES = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds between tries to start a dead engine again; the last repeats."""


def exit_description(returncode: int | None) -> str:
    if returncode is None:
        return "closed its socket"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


class _Connection:
    """One running engine process and the generations it is serving."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ready: Ready,
    ) -> None:
        self.process = process
        self.reader = reader
        self.writer = writer
        self.capabilities = ready.capabilities
        self.streams: dict[int, asyncio.Queue[FromEngine | BackendError]] = {}
        self.lost: str | None = None
        """Why the connection is gone (the process's end), once it is."""

    def send(self, message: ToEngine) -> None:
        """Write without awaiting (a cancelled generation's cleanup cannot await)."""
        if self.lost is None and not self.writer.is_closing():
            self.writer.write(frame(message))

    async def read_all(self) -> None:
        """Hand each frame to its generation until the process's end of the socket closes."""
        try:
            while (message := await read_from_engine(self.reader)) is not None:
                if isinstance(message, Log):
                    relay(message, self.process.pid)
                elif isinstance(message, Delta | Failed | Ended):
                    stream = self.streams.get(message.id)
                    if stream is not None:  # else its generation was cancelled meanwhile
                        stream.put_nowait(message)
        except (FrameError, ConnectionError) as exc:
            logger.error("engine process %d sent a broken frame: %s", self.process.pid, exc)
        finally:
            self.writer.close()
            returncode = await _reap(self.process, grace=5.0)
            self.lost = f"the engine process {exit_description(returncode)}"
            for stream in self.streams.values():
                stream.put_nowait(GenerationFailed(self.lost))


def relay(message: Log, pid: int) -> None:
    """An engine's log record, written out by this process's logging with the engine's pid."""
    logging.getLogger(message.logger).log(message.level, "%s", message.message, extra={"engine_pid": pid})


async def _reap(process: asyncio.subprocess.Process, grace: float) -> int | None:
    """The process's exit status, killing it if it does not exit within ``grace`` seconds."""
    try:
        return await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()


class EngineProcessBackend:
    """A local backend (llamacpp, exllamav2, scripted) served by a process of its own."""

    def __init__(self, kind: str, config: BackendConfig, local: Backend, *, weights_dir: Path | None = None) -> None:
        """``local`` is the same engine built in this process, never started: it answers
        preflight and weights questions, and the capabilities until the engine reports its own."""
        self._name = config.name
        # The engine process builds its backend in process: it must not start a process in turn.
        inner = dataclasses.replace(config, options={**config.options, "engine_process": False})
        self._spec = EngineSpec(kind, inner, str(weights_dir) if weights_dir is not None else None)
        self._local = local
        self._capabilities = local.capabilities
        self._connection: _Connection | None = None
        self._reading: asyncio.Task[None] | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._problem: str | None = f"model {config.name!r}: the engine process is not started"
        self._exits = 0

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    @property
    def pid(self) -> int | None:
        """The engine process's id while one is serving."""
        connection = self._connection
        return connection.process.pid if connection is not None and connection.lost is None else None

    def problem(self) -> str | None:
        return self._problem

    @property
    def engine_exits(self) -> int:
        return self._exits

    def preflight(self) -> None:
        """The engine's own preflight, run in a short-lived process as the engine will run: an
        engine's checks may import it (exllamav2 imports torch and builds its CUDA extension)."""
        if not isinstance(self._local, Preflight):
            return
        checked = subprocess.run(
            [*self._command(), "--preflight"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if checked.returncode == PREFLIGHT_REFUSED:
            raise BackendUnavailable(checked.stdout.strip())
        if checked.returncode != 0:
            last = (checked.stderr.strip().splitlines() or [exit_description(checked.returncode)])[-1]
            raise BackendUnavailable(f"model {self._name!r}: the engine's check failed: {last}")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "backends.engine_process.server", "--spec", encode_spec(self._spec)]

    async def start(self) -> None:
        if self._connection is not None:
            return
        self._stopping = False
        self._attach(await self._launch())

    async def stop(self) -> None:
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
            self._restarting = None
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.send(Shutdown())
            await _reap(connection.process, grace=SHUTDOWN_SECONDS)
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
            self._reading = None
        self._problem = f"model {self._name!r}: the engine process is stopped"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        connection = self._connection
        if connection is None or connection.lost is not None:
            raise BackendUnavailable(self._problem or f"model {self._name!r}: the engine process is not started")
        id = next(self._ids)
        stream: asyncio.Queue[FromEngine | BackendError] = asyncio.Queue()
        connection.streams[id] = stream
        connection.send(Generate(id, request))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, Delta):
                    finished = item.delta.finish_reason is not None
                    yield item.delta
                    if finished:
                        return
                elif isinstance(item, Failed):
                    finished = True
                    raise failure_error(item)
                elif isinstance(item, BackendError):
                    finished = True
                    raise item
                else:
                    finished = True
                    return
        finally:
            del connection.streams[id]
            if not finished:
                connection.send(Cancel(id))

    async def _launch(self) -> _Connection:
        """Start an engine process and wait until its model is loaded."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            process = await asyncio.create_subprocess_exec(
                *self._command(),
                "--fd",
                str(theirs.fileno()),
                "--log-level",
                logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # Its own session: a terminal's Ctrl-C reaches the gateway, which drains its
                # requests and then stops the engine, rather than both dying at once.
                start_new_session=True,
            )
            theirs.close()
            try:
                reader, writer = await asyncio.open_unix_connection(sock=ours.dup())
                # Loading a model logs (llama.cpp's lines, the load time) before it is ready.
                while isinstance(first := await read_from_engine(reader), Log):
                    relay(first, process.pid)
            except BaseException:
                process.kill()
                await process.wait()
                raise
        if isinstance(first, Ready):
            logger.info("engine process %d serves model %s", process.pid, self._name)
            return _Connection(process, reader, writer, first)
        writer.close()
        returncode = await _reap(process, grace=5.0)
        if isinstance(first, StartFailed):
            raise BackendUnavailable(first.message)
        raise BackendUnavailable(
            f"model {self._name!r}: the engine process {exit_description(returncode)} before it was ready"
        )

    def _attach(self, connection: _Connection) -> None:
        self._connection = connection
        self._capabilities = connection.capabilities
        self._problem = None
        self._reading = asyncio.create_task(self._read(connection), name=f"engine-{self._name}")

    async def _read(self, connection: _Connection) -> None:
        await connection.read_all()
        if self._stopping or self._connection is not connection:
            return
        self._exits += 1
        self._problem = f"model {self._name!r}: {connection.lost}; starting it again"
        logger.error("engine process %d of model %s: %s", connection.process.pid, self._name, connection.lost)
        self._restarting = asyncio.create_task(self._restart(), name=f"engine-restart-{self._name}")

    async def _restart(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RESTART_PAUSES[min(attempt, len(RESTART_PAUSES) - 1)])
            try:
                connection = await self._launch()
            except BackendUnavailable as exc:
                self._problem = f"model {self._name!r}: the engine process could not start again: {exc}"
                logger.error("engine for model %s did not start again: %s", self._name, exc)
                continue
            logger.info("engine process of model %s started again (pid %d)", self._name, connection.process.pid)
            self._restarting = None
            self._attach(connection)
            return


class WeightsPreparingEngineProcess(EngineProcessBackend):
    """An engine process whose engine makes its weights file first (llama.cpp's conversions):
    made here, before the process starts, so progress is shown where the gateway shows it."""

    def prepare_weights(self, progress: WeightsProgress | None = None) -> Path:
        assert isinstance(self._local, PreparesWeights)
        return self._local.prepare_weights(progress)
