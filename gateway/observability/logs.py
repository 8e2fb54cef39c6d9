"""Log output: JSON lines in production, readable console lines in development.

Records from structlog, the standard library and uvicorn all pass through one formatter, so every
line has the same shape: ``timestamp``, ``level``, ``logger``, ``event``, ``pid``, and the
``request_id`` of the request being served when the line was written (bound with contextvars by
the request middleware), followed by the event's own fields.

Secrets and content are kept out whatever a caller passes: ``Authorization`` and other credential
headers are redacted wherever they appear, and prompts and completions are dropped unless the
operator turned on ``log_content``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import msgspec
import structlog
from litestar.logging.config import StructLoggingConfig
from structlog.typing import EventDict, Processor, WrappedLogger

from gateway.settings import Settings

REDACTED = "[redacted]"
SECRET_FIELDS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api_key", "cookie", "set-cookie"})
CONTENT_FIELDS = frozenset({"prompt", "messages", "completion", "completions", "content", "input", "system_prompt"})
# Loggers that servers and frameworks may have given handlers of their own: they lose them and
# propagate to the root handler. (uvicorn.access is left as uvicorn sets it: the gateway writes
# its own line per request.)
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi", "litestar")
_LEADING_FIELDS = ("timestamp", "level", "logger", "event")
TRACE_LEVEL = 5  # uvicorn's "trace"

_json = msgspec.json.Encoder(enc_hook=str, decimal_format="string")


def wants_json(log_format: str, stream: TextIO | None = None) -> bool:
    """``auto`` means JSON unless a person is watching the terminal."""
    if log_format != "auto":
        return log_format == "json"
    stream = sys.stdout if stream is None else stream
    return not (hasattr(stream, "isatty") and stream.isatty())


def level_number(name: str) -> int:
    if name.lower() == "trace":
        return TRACE_LEVEL
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


_PLAIN = frozenset({str, int, float, bool, type(None)})
"""Types of values that cannot hold a secret under a name of their own: passed as they are."""


def _scrub(value: Any, depth: int = 0) -> Any:
    # Every field of every line passes here: the common case is answered first, without ABC checks.
    if type(value) in _PLAIN or depth > 3:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple) and value and all(_is_pair(item) for item in value):
        # ASGI-style header lists: [(name, value), ...]
        return [(k, REDACTED if _is_secret(k) else v) for k, v in value]
    return value


def _is_pair(item: object) -> bool:
    return isinstance(item, list | tuple) and len(item) == 2


def _is_secret(name: object) -> bool:
    if isinstance(name, bytes):
        name = name.decode("latin-1")
    return isinstance(name, str) and _secret_name(name)


@functools.lru_cache(maxsize=1024)
def _secret_name(name: str) -> bool:
    # Lines repeat the same few field names: each is lowered and looked up once.
    return name.lower() in SECRET_FIELDS


class Redactor:
    """Redacts credentials everywhere; drops prompt and completion text unless allowed."""

    def __init__(self, *, log_content: bool) -> None:
        self.log_content = log_content

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        # Every line passes here: names are looked up in one cached call, plain values skipped.
        for name, value in list(event_dict.items()):
            if isinstance(name, str) and _secret_name(name):
                event_dict[name] = REDACTED
            elif name in CONTENT_FIELDS and not self.log_content:
                del event_dict[name]
            elif type(value) not in _PLAIN:
                event_dict[name] = _scrub(value)
        return event_dict


def _add_pid(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # Tells apart the lines of several uvicorn workers writing to one stream.
    if "pid" not in event_dict:
        event_dict["pid"] = os.getpid()
    return event_dict


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
    return event_dict


def _dumps(event_dict: EventDict, **_: Any) -> str:
    # The fields every line has come first, so lines read well before any tool parses them.
    ordered = {name: event_dict.pop(name) for name in _LEADING_FIELDS if name in event_dict}
    ordered.update(event_dict)
    return _json.encode(ordered).decode()


_timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")


def structlog_processors() -> list[Processor]:
    """The chain of events logged through structlog, up to the hand-off to ``logging``."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.filter_by_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        _timestamper,
        structlog.processors.StackInfoRenderer(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]


def _foreign_pre_chain() -> list[Processor]:
    """What records from plain ``logging`` (uvicorn, SQLAlchemy, ...) get before rendering."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        _drop_color_message,
        _timestamper,
    ]


def build_formatter(*, as_json: bool, log_content: bool, colors: bool = False) -> logging.Formatter:
    renderer: Processor
    tail: Sequence[Processor]
    if as_json:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        tail = [structlog.processors.format_exc_info, renderer]
    else:
        tail = [structlog.dev.ConsoleRenderer(colors=colors)]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_foreign_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _add_pid,
            Redactor(log_content=log_content),
            *tail,
        ],
    )


def _configure_structlog() -> None:
    structlog.configure(
        processors=structlog_processors(),
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Send every log record of this process to ``stream`` (stdout) in the configured format.

    Called once per process by ``serve`` and by each uvicorn worker before the app is built.
    """
    stream = sys.stdout if stream is None else stream
    as_json = wants_json(settings.log_format, stream)
    _configure_structlog()
    # No line shows where a record was made, nor its thread or process name: skip collecting them
    # (the "Optimization" section of the logging documentation; the caller lookup walks the stack).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # new in 3.12, not in the stubs
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        build_formatter(as_json=as_json, log_content=settings.log_content, colors=not as_json and stream.isatty())
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level_number(settings.log_level))
    for name in SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers = []
        server_logger.propagate = True


def litestar_logging_config() -> StructLoggingConfig:
    """Litestar's view of the same set-up, so ``request.logger`` is a structlog logger.

    Litestar applies it when the app is built; it configures structlog only, never the
    handlers of ``logging``, which belong to the process (``configure_logging``).
    """
    return StructLoggingConfig(
        processors=structlog_processors(),
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
        # The app's own handler logs unexpected errors once; Litestar need not log them again.
        log_exceptions="never",
    )
