"""The engine process: one model's backend, driven over a socket by the gateway.

Started by `EngineProcessBackend` as ``python -m backends.engine_process.server --fd N --spec JSON``
with one end of a Unix socket pair. It loads the model, answers `Ready` (or `StartFailed`),
then runs each `Generate` as a task that forwards the backend's deltas as they come. Writing a
frame waits while the socket's buffer is full, so a gateway that stops reading slows its
generations down instead of growing this process's memory. It exits on `Shutdown` or when the
gateway's end of the socket closes (the gateway died): either way it stops the backend first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from backends.base import Backend, BackendError, BackendUnavailable, GenerationRequest, Preflight
from backends.engine_process.wire import (
    PREFLIGHT_REFUSED,
    Cancel,
    Delta,
    Ended,
    EngineSpec,
    Failed,
    FrameError,
    Generate,
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


async def serve(spec: EngineSpec, sock: socket.socket) -> int:
    """Serve the gateway on ``sock`` until it says `Shutdown` or goes away; the exit status."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
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
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s engine[{os.getpid()}] %(name)s: %(message)s",
    )
    spec = decode_spec(args.spec)
    sock = socket.socket(fileno=args.fd)
    return asyncio.run(serve(spec, sock))


if __name__ == "__main__":
    sys.exit(main())
