"""Fail closed: a request that needs the database while it is out of reach is refused, not served free.

Authenticating a key that is not in the cache, and loading a key's spend for its budget, need the
database. When it does not answer within ``DATABASE_WAIT_S`` or fails to connect, the request gets
503 with ``Retry-After`` in OpenAI's envelope (the SDKs retry it) before any work starts, rather
than a 500 or a wait on a connection that may never come. Requests that need nothing from the
database, a key still in the cache, go on being served; their usage is spooled (``usage.spool``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from gateway.errors import ApiError

logger = logging.getLogger(__name__)

DATABASE_WAIT_S = 5.0
RETRY_AFTER_S = 2
# asyncpg raises OSError (connection refused, reset) unwrapped while it connects.
_DATABASE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


def is_database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is out of reach (not that a statement was wrong)."""
    return isinstance(exc, OperationalError | InterfaceError | SQLAlchemyTimeoutError | OSError | TimeoutError)


def database_unavailable() -> ApiError:
    return ApiError(
        503,
        "The gateway's database is unavailable; the request was not started. Please retry shortly.",
        type="server_error",
        code="database_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


@asynccontextmanager
async def needing_database(purpose: str) -> AsyncIterator[None]:
    """Turn the database's absence within the block into a 503 ``ApiError``."""
    try:
        async with asyncio.timeout(DATABASE_WAIT_S):
            yield
    except _DATABASE_ERRORS as exc:
        logger.warning("%s refused, the database is unavailable: %s", purpose, str(exc) or type(exc).__name__)
        raise database_unavailable() from exc


def failing_closed[**P, T](call: Callable[P, Awaitable[T]], purpose: str) -> Callable[P, Awaitable[T]]:
    """``call``, with the database's absence turned into a 503 ``ApiError``."""

    async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
        async with needing_database(purpose):
            return await call(*args, **kwargs)

    return guarded
