"""The frames between the gateway and an engine process: msgpack messages, each behind its length.

One socket carries every generation of one engine process; frames name the generation they
belong to. The gateway sends `Generate`, `Cancel` and `Shutdown`; the engine answers with
`Ready` (or `StartFailed`) once, then `Delta`, `Failed` and `Ended` per generation. The values
inside are the backend protocol's own dataclasses, which msgspec encodes field by field.
"""

from __future__ import annotations

import asyncio
import struct
from types import MappingProxyType

import msgspec

from backends.base import (
    BackendCapabilities,
    BackendError,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    TokenDelta,
)
from backends.config import BackendConfig

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""A frame larger than this is a broken peer, not a message (a prompt of 100k tokens is ~500 KB)."""

PREFLIGHT_REFUSED = 3
"""The exit status of an engine's preflight that refused to start, its reason on stdout."""

MAX_LOG_MESSAGE_CHARS = 16_384
"""A longer log message (a traceback, a runaway engine line) is cut to this many characters."""

_LENGTH = struct.Struct(">I")


class Generate(msgspec.Struct, tag=True, frozen=True):
    id: int
    request: GenerationRequest


class Cancel(msgspec.Struct, tag=True, frozen=True):
    """Stop generation ``id`` at once and free its slot; nothing more is sent for it."""

    id: int


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    """Stop the engine and exit (the gateway has drained its requests)."""


class Ready(msgspec.Struct, tag=True, frozen=True):
    capabilities: BackendCapabilities
    pid: int


class StartFailed(msgspec.Struct, tag=True, frozen=True):
    """The engine could not start; ``message`` is its one sentence (`BackendUnavailable`)."""

    message: str


class Delta(msgspec.Struct, tag=True, frozen=True):
    id: int
    delta: TokenDelta


class Failed(msgspec.Struct, tag=True, frozen=True):
    """Generation ``id`` failed; ``kind`` names the `BackendError` subclass to raise."""

    id: int
    message: str
    kind: str


class Ended(msgspec.Struct, tag=True, frozen=True):
    """Generation ``id`` ended without a finish reason (the engine's stream just stopped)."""

    id: int


class Log(msgspec.Struct, tag=True, frozen=True):
    """A log record of the engine process, written out by the gateway's own logging."""

    level: int
    logger: str
    message: str


ToEngine = Generate | Cancel | Shutdown
FromEngine = Ready | StartFailed | Delta | Failed | Ended | Log

_encoder = msgspec.msgpack.Encoder()
_to_engine: msgspec.msgpack.Decoder[ToEngine] = msgspec.msgpack.Decoder(ToEngine)
_from_engine: msgspec.msgpack.Decoder[FromEngine] = msgspec.msgpack.Decoder(FromEngine)


# The errors a generation can end with, by name: the gateway answers each differently (a
# grammar no reply follows is the client's fault, a failure mid-generation is retried).
_ERRORS: dict[str, type[BackendError]] = {
    cls.__name__: cls for cls in (BackendError, BackendUnavailable, GenerationFailed, GrammarRejected)
}


def failed(id: int, exc: BackendError) -> Failed:
    kind = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in _ERRORS), "BackendError")
    return Failed(id, str(exc), kind)


def failure_error(message: Failed) -> BackendError:
    """The exception the engine raised, rebuilt on the gateway's side."""
    return _ERRORS.get(message.kind, GenerationFailed)(message.message)


class FrameError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def frame(message: ToEngine | FromEngine) -> bytes:
    payload = _encoder.encode(message)
    return _LENGTH.pack(len(payload)) + payload


async def _read_payload(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; ``None`` at a clean end of stream (the peer closed)."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("the stream ended inside a frame header") from None
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {length} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise FrameError("the stream ended inside a frame") from None


async def _read[M](reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[M], sender: str) -> M | None:
    payload = await _read_payload(reader)
    if payload is None:
        return None
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise FrameError(f"not {sender} message: {exc}") from None


async def read_to_engine(reader: asyncio.StreamReader) -> ToEngine | None:
    return await _read(reader, _to_engine, "a gateway")


async def read_from_engine(reader: asyncio.StreamReader) -> FromEngine | None:
    return await _read(reader, _from_engine, "an engine")


class EngineSpec(msgspec.Struct, frozen=True):
    """What an engine process serves: given on its command line as JSON."""

    kind: str
    config: BackendConfig
    weights_dir: str | None = None


def _read_only_mapping(value: object) -> object:
    # A config's options are a read-only view, which msgspec does not encode by itself.
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"an engine spec cannot hold a {type(value).__name__}")


def encode_spec(spec: EngineSpec) -> str:
    return msgspec.json.encode(spec, enc_hook=_read_only_mapping).decode()


def decode_spec(text: str) -> EngineSpec:
    return msgspec.json.decode(text, type=EngineSpec)
