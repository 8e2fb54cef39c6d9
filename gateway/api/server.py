"""Running the app under uvicorn."""

from __future__ import annotations

import os
import signal
from types import FrameType

import uvicorn
from litestar import Litestar

from gateway.api.http_protocol import JsonErrorHttpToolsProtocol
from gateway.observability.drain import AFTER_DRAIN_GRACE_SECONDS
from gateway.observability.logs import configure_logging
from gateway.observability.metrics import multiprocess_directory
from gateway.settings import Settings, load_settings


def app_from_environment() -> Litestar:
    """App factory for uvicorn worker processes: each reads the same config file and environment."""
    from gateway.api.app import create_app

    settings = load_settings()
    configure_logging(settings)
    return create_app(settings, freeze_garbage=True)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    # Before uvicorn starts, SIGTERM stops the start-up; after its graceful shutdown, uvicorn
    # raises the signal again, and the process should then end with 0, not die of it.
    raise SystemExit(0)


def run(settings: Settings, *, workers: int = 1, config_path: str | None = None) -> None:
    configure_logging(settings)
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # The app drains on SIGTERM (gateway.observability.drain) before uvicorn's own shutdown begins.
        "timeout_graceful_shutdown": AFTER_DRAIN_GRACE_SECONDS,
        "access_log": False,
        # Nothing in the gateway reads the client's address; checking forwarded headers on every
        # request would be work for nothing.
        "proxy_headers": False,
        "log_config": None,  # uvicorn's loggers propagate to the gateway's handler
        "http": JsonErrorHttpToolsProtocol,
    }
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with multiprocess_directory(workers):
        if workers > 1:
            # Worker processes build their own app from the same settings source.
            if config_path is not None:
                os.environ["LLAMA_GATEWAY_CONFIG"] = config_path
            uvicorn.run("gateway.api.server:app_from_environment", factory=True, workers=workers, **options)  # type: ignore[arg-type]
            return
        from gateway.api.app import create_app

        uvicorn.run(create_app(settings, freeze_garbage=True), **options)  # type: ignore[arg-type]
