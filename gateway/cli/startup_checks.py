"""Checks ``serve`` makes before uvicorn starts, so a start that cannot succeed ends with one
sentence saying what to fix (and a non-zero exit), not a traceback from inside the lifespan."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from gateway.settings import Settings


class StartupError(Exception):
    """The gateway cannot start here; the message is one sentence with the fix."""


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a previous run is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use; stop the process that holds it "
                    "or choose another with --port (setting: port)"
                ) from exc
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from exc


async def _check_database(url: str) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.accounting.services import open_database
    from gateway.db import DatabaseNotReady, safe_url

    try:
        engine, _ = await open_database(url)
    except DatabaseNotReady as exc:
        raise StartupError(str(exc)) from exc
    except (OSError, SQLAlchemyError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise StartupError(
            f"cannot open the database at {safe_url(url)} ({reason}); check that it is running and that "
            "database_url (LLAMA_GATEWAY_DATABASE_URL) names it"
        ) from exc
    await engine.dispose()


def check_initial_admin_key(preset: str | None) -> None:
    from gateway.accounting.keys.records import InvalidKeyFields, check_preset_key

    if preset is None:
        return
    try:
        check_preset_key(preset)
    except InvalidKeyFields as exc:
        raise StartupError(f"initial_admin_key (LLAMA_GATEWAY_INITIAL_ADMIN_KEY): {exc}") from exc


def check_workers(settings: Settings, workers: int) -> None:
    """Several workers are several replicas on one host: limits must live where all of them see them."""
    if workers > 1 and not settings.redis_url:
        raise StartupError(
            f"--workers {workers} needs redis_url (LLAMA_GATEWAY_REDIS_URL): without it each worker keeps its "
            "own rate limits and budget reservations, so a key could exceed them; set redis_url or serve one worker"
        )


def check_startup(settings: Settings, *, workers: int = 1) -> None:
    """Raise ``StartupError`` when the worker count cannot keep limits, the preset admin key is
    malformed, the port is taken, or the database is unreachable or behind. Nothing is written
    before the workers, key and port are checked."""
    check_workers(settings, workers)
    check_initial_admin_key(settings.initial_admin_key)
    check_port_free(settings.host, settings.port)
    # Alembic announces its dialect on every connection; here that would only precede the sentence.
    migration_log = logging.getLogger("alembic.runtime.migration")
    level = migration_log.level
    migration_log.setLevel(logging.WARNING)
    try:
        asyncio.run(_check_database(settings.database_url))
    except StartupError:
        raise
    except Exception as exc:  # asyncpg raises its own error types for refused logins, bad names, ...
        raise StartupError(
            f"cannot open the database ({type(exc).__name__}: {exc}); check database_url (LLAMA_GATEWAY_DATABASE_URL)"
        ) from exc
    finally:
        migration_log.setLevel(level)
