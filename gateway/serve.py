"""Running the app under uvicorn."""

from __future__ import annotations

import os

import uvicorn
from litestar import Litestar

from gateway.settings import Settings, load_settings


def app_from_environment() -> Litestar:
    """App factory for uvicorn worker processes: each reads the same config file and environment."""
    from gateway.app import create_app

    return create_app(load_settings())


def run(settings: Settings, *, workers: int = 1, config_path: str | None = None) -> None:
    options = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(settings.drain_seconds),
        "access_log": False,
    }
    if workers > 1:
        # Worker processes build their own app from the same settings source.
        if config_path is not None:
            os.environ["LLAMA_GATEWAY_CONFIG"] = config_path
        uvicorn.run("gateway.serve:app_from_environment", factory=True, workers=workers, **options)  # type: ignore[arg-type]
        return
    from gateway.app import create_app

    uvicorn.run(create_app(settings), **options)  # type: ignore[arg-type]
