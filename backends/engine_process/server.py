"""The engine process: one model's backend, driven over a socket by the gateway.

Started by `EngineProcessBackend` as ``python -m backends.engine_process.server --fd N --spec JSON``
with one end of a Unix socket pair. It loads the model, answers `Ready` (or `StartFailed`),
then runs each `Generate` as a task that forwards the backend's deltas as they come. Writing a
frame waits while the socket's buffer is full, so a gateway that stops reading slows its
generations down instead of growing this process's memory. It exits on `Shutdown` or when the
gateway's end of the socket closes (the gateway died): either way it stops the backend first.
Its log records go to the gateway as `Log` frames while the connection is open, so they come out
in the gateway's format; to stderr before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from backends.base import Backend, BackendError, BackendUnavailable, GenerationRequest, Preflight
from backends.engine_process.wire import (
    MAX_LOG_MESSAGE_CHARS,
    PREFLIGHT_REFUSED,
    Cancel,
    Delta,
    Ended,
    EngineSpec,
    Failed,
    FrameError,
    Generate,
    Log,
    Ready,
    Shutdown,
    StartFailed,
    decode_spec,
    failed,
    frame,
    read_to_engine,
)
from backends.factory import ENGINE_PROCESS_BY_DEFAULT, BackendKind, create_backend

logger = logging.getLogger("backends.engine_process")


class ForwardingHandler(logging.Handler):
    """Sends each log record to the gateway as a `Log` frame, so the engine's lines come out in
    the gateway's own format; to ``fallback`` (stderr) before the connection is made and after
    it is gone. Records from other threads (an engine's generator thread, llama.cpp's log
    callback) are written from the event loop's thread."""

    def __init__(self, fallback: logging.Handler) -> None:
        super().__init__()
        self._fallback = fallback
        self._writer: asyncio.StreamWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._plain = logging.Formatter()

    def attach(self, writer: asyncio.StreamWriter) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._writer = writer

    def detach(self) -> None:
        self._writer = None

    def emit(self, record: logging.LogRecord) -> None:
        writer, loop = self._writer, self._loop
        if writer is None or loop is None or writer.is_closing():
            self._fallback.handle(record)
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self._plain.formatException(record.exc_info)
            data = frame(Log(record.levelno, record.name, message[:MAX_LOG_MESSAGE_CHARS]))
            if threading.get_ident() == self._loop_thread:
                writer.write(data)
            else:
                loop.call_soon_threadsafe(self._write, writer, data)
        except RuntimeError:  # the loop is closed: the process is ending
            self._fallback.handle(record)
        except Exception:
            self.handleError(record)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        if not writer.is_closing():
            writer.write(data)


class _Session:
    """The generations under way, each a task writing its deltas to the gateway."""

    def __init__(self, backend: Backend, writer: asyncio.StreamWriter) -> None:
        self._backend = backend
        self._writer = writer
        self._jobs: dict[int, asyncio.Task[None]] = {}

    def start(self, id: int, request: GenerationRequest) -> None:
        self._jobs[id] = asyncio.create_task(self._run(id, request), name=f"generation-{id}")

    def cancel(self, id: int) -> None:
        # A job that already ended is not an error: its Cancel crossed its last delta.
        job = self._jobs.pop(id, None)
        if job is not None:
            job.cancel()

    async def cancel_all(self) -> None:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _run(self, id: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(self._backend.generate(request)) as deltas:
                async for delta in deltas:
                    self._writer.write(frame(Delta(id, delta)))
                    await self._writer.drain()
                    if delta.finish_reason is not None:
                        return
            self._writer.write(frame(Ended(id)))
        except BackendError as exc:
            self._writer.write(frame(failed(id, exc)))
        except Exception as exc:  # reported to the gateway's request, never lost here
            if self._writer.is_closing():
                return  # the gateway is gone; the main loop is shutting down
            logger.exception("generation %d failed", id)
            self._writer.write(frame(Failed(id, f"the engine failed: {exc}", "GenerationFailed")))
        finally:
            self._jobs.pop(id, None)


async def serve(spec: EngineSpec, sock: socket.socket, forwarding: ForwardingHandler | None = None) -> int:
    """Serve the gateway on ``sock`` until it says `Shutdown` or goes away; the exit status."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    if forwarding is not None:
        forwarding.attach(writer)
    try:
        return await _serve(spec, reader, writer)
    finally:
        if forwarding is not None:
            forwarding.detach()


async def _serve(spec: EngineSpec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    weights_dir = Path(spec.weights_dir) if spec.weights_dir is not None else None
    try:
        backend = create_backend(_kind(spec.kind), spec.config, weights_dir=weights_dir)
        await backend.start()
    except BackendUnavailable as exc:
        return await _refuse(writer, str(exc))
    except Exception as exc:
        logger.exception("the engine failed to start")
        return await _refuse(writer, f"model {spec.config.name!r}: the engine failed to start: {exc}")
    session = _Session(backend, writer)
    try:
        writer.write(frame(Ready(backend.capabilities, os.getpid())))
        while True:
            message = await read_to_engine(reader)
            if message is None or isinstance(message, Shutdown):
                break
            if isinstance(message, Generate):
                session.start(message.id, message.request)
            elif isinstance(message, Cancel):
                session.cancel(message.id)
    except (FrameError, ConnectionError) as exc:
        logger.error("the gateway's connection broke: %s", exc)
    finally:
        await session.cancel_all()
        await backend.stop()
        writer.close()
    return 0


async def _refuse(writer: asyncio.StreamWriter, message: str) -> int:
    with contextlib.suppress(ConnectionError):
        writer.write(frame(StartFailed(message)))
        await writer.drain()
    writer.close()
    return 1


def _kind(kind: str) -> BackendKind:
    if kind not in ENGINE_PROCESS_BY_DEFAULT:
        raise BackendUnavailable(f"an engine process cannot serve backend {kind!r}")
    return kind  # type: ignore[return-value]  # checked just above


def preflight(spec: EngineSpec) -> int:
    """Check, where the engine will run, that it can start; say why not in one line on stdout."""
    weights_dir = Path(spec.weights_dir) if spec.weights_dir is not None else None
    try:
        backend = create_backend(_kind(spec.kind), spec.config, weights_dir=weights_dir)
        if isinstance(backend, Preflight):
            backend.preflight()
    except BackendUnavailable as exc:
        print(exc, flush=True)
        return PREFLIGHT_REFUSED
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.engine_process.server")
    parser.add_argument("--fd", type=int, help="this process's end of the gateway's socket pair")
    parser.add_argument("--spec", required=True, help="what to serve, as JSON (EngineSpec)")
    parser.add_argument("--preflight", action="store_true", help="only check that the engine could start")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.preflight:
        return preflight(decode_spec(args.spec))
    if args.fd is None:
        parser.error("--fd is needed to serve")
    fallback = logging.StreamHandler(sys.stderr)
    fallback.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s engine[{os.getpid()}] %(name)s: %(message)s"))
    forwarding = ForwardingHandler(fallback)
    logging.basicConfig(level=args.log_level, handlers=[forwarding])
    spec = decode_spec(args.spec)
    sock = socket.socket(fileno=args.fd)
    return asyncio.run(serve(spec, sock, forwarding))


if __name__ == "__main__":
    sys.exit(main())
