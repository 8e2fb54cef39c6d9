"""Observability of one app: its metrics, request observation and drain, wired together.

``create_app`` builds one ``Observability`` and takes from it the middleware, a lifespan and
the ``/metrics`` exposition. Values owned by other parts (slot queues, the usage writer, the
database and backends' health) are copied into gauges when scraped, and every second under
several workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.middleware import DefineMiddleware
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from backends.base import HasReplicas, ReportsProblems
from gateway.observability.drain import Drain, DrainMiddleware
from gateway.observability.metrics import GatewayMetrics, ReplicaMetrics, forget_this_process, multiprocess_enabled
from gateway.observability.request_observer import ObservedMetering, RequestObserver
from gateway.settings import Settings
from gateway.state import GatewayState

OBSERVABILITY_KEY = "observability"
DATABASE_CHECK_TIMEOUT_S = 2.0
LIVE_VALUES_INTERVAL_S = 1.0


async def database_problem(engine: AsyncEngine, within_s: float) -> str | None:
    """None when the database answers ``SELECT 1`` within ``within_s``, else what went wrong."""
    try:
        async with asyncio.timeout(within_s):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except TimeoutError:
        return f"database: no answer within {within_s:g} s"
    except Exception as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:  # the driver's own error, under SQLAlchemy's wrappers
            cause = cause.__cause__
        detail = (str(cause).strip().splitlines() or [""])[0][:200]
        return f"database: {type(cause).__name__}: {detail}".rstrip(": ")
    return None


class Observability:
    """Metrics, the per-request log line and the drain of one app."""

    def __init__(self, settings: Settings, state: GatewayState) -> None:
        self.metrics = GatewayMetrics()
        self.drain = Drain(state, settings.drain_seconds)
        self._state = state
        self._log_content = settings.log_content

    @property
    def middleware(self) -> list[DefineMiddleware]:
        """To follow the request id middleware: drain refusals are observed like any answer."""
        return [
            DefineMiddleware(RequestObserver, metrics=self.metrics),
            DefineMiddleware(DrainMiddleware, drain=self.drain),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Litestar) -> AsyncIterator[None]:
        """To follow the app's own lifespan, which opens accounting and sets the metering."""
        metering = ObservedMetering(self._state.metering, self.metrics, log_content=self._log_content)
        self._state.metering = metering
        with contextlib.suppress(RuntimeError):  # a gateway without accounting records no usage
            # A request's row may be committed on the loop while it is the only one served.
            self._state.accounting.usage.commit_here_while(lambda: self.drain.in_flight <= 1)
        for runtime in self._state.models:
            if isinstance(runtime.backend, HasReplicas):
                runtime.backend.observe_replicas(ReplicaMetrics(self.metrics, runtime.name))
        # Other workers' scrapes read this worker's gauges from files: keep them fresh.
        copier = asyncio.create_task(self._copy_periodically()) if multiprocess_enabled() else None
        try:
            async with self.drain.handling_sigterm():
                yield
            await metering.settle()
        finally:
            if copier is not None:
                copier.cancel()
                await asyncio.gather(copier, return_exceptions=True)
            forget_this_process()

    async def _copy_periodically(self) -> None:
        while True:
            self.copy_live_values()
            await asyncio.sleep(LIVE_VALUES_INTERVAL_S)

    def copy_live_values(self) -> None:
        state, metrics = self._state, self.metrics
        unable: set[str] = set()
        for runtime in state.models:
            metrics.queue_depth.labels(runtime.name).set(runtime.queue.waiting)
            metrics.running.labels(runtime.name).set(runtime.queue.running)
            backend = runtime.backend
            if isinstance(backend, ReportsProblems):
                if backend.problem() is not None:
                    unable.add(runtime.name)
                exits = metrics.engine_exits.labels(runtime.name)
                metrics.copy_total(exits, f"engine_exits {runtime.name}", backend.engine_exits)
        metrics.set_backends([runtime.name for runtime in state.models], started=state.ready, unable=unable)
        metrics.draining.set(1 if state.draining else 0)
        try:
            recorder = state.accounting.usage
        except RuntimeError:
            return  # accounting is not open (yet)
        metrics.usage_backlog.set(recorder.backlog)
        metrics.copy_total(metrics.usage_failures, "usage_failures", recorder.failures)
        metrics.copy_total(metrics.usage_rejected, "usage_rejected", recorder.rejected)
        metrics.copy_total(metrics.usage_spooled, "usage_spooled", recorder.spooled)
        metrics.copy_total(metrics.usage_replayed, "usage_replayed", recorder.replayed)
        metrics.usage_spool_bytes.set(recorder.spool_bytes)

    async def check_database(self) -> str | None:
        """None when the database is reachable, else why not; updates ``database_up``."""
        try:
            engine = self._state.accounting.engine
        except RuntimeError:
            problem: str | None = "database: not connected yet"
        else:
            problem = await database_problem(engine, DATABASE_CHECK_TIMEOUT_S)
        self.metrics.database_up.set(0 if problem else 1)
        return problem

    async def scrape(self, accept: str | None) -> tuple[bytes, str]:
        self.copy_live_values()
        await self.check_database()
        return self.metrics.render(accept)


def observability(connection: ASGIConnection[Any, Any, Any, Any]) -> Observability:
    value: Observability = connection.app.state[OBSERVABILITY_KEY]
    return value
