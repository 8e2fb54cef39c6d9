"""What the gateway tells its operators about each request: one log line and metrics.

``RequestObserver`` (middleware) binds the request id to the log context of everything the
request logs, counts the request by route, model and status, and once the response is sent
writes the request's one log line. ``ObservedMetering`` wraps the metering the routes use; its
tickets, when a generation's outcome is known, count tokens, cost and latencies, and hand the
outcome (tokens, cost, TTFT) to that line. The route's admission (``gateway.api.admission``)
leaves the model and the ticket in the request's scope, where the observer finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send
from litestar.types import Message as ASGIMessage

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.metering import AdmissionRequest, Metering, Ticket, billed_as
from gateway.accounting.usage import UsageStatus
from gateway.accounting.usage.pricing import cost
from gateway.observability.drain import PROBE
from gateway.observability.metrics import GatewayMetrics
from gateway.serving.generation import Generation
from gateway.state import (
    API_KEY_SCOPE_KEY,
    OBSERVED_MODEL_SCOPE_KEY,
    OBSERVED_TICKET_SCOPE_KEY,
    REQUEST_ID_SCOPE_KEY,
)

# How long a finished response's log line waits for a usage row still being written
# (a stream the client left: its row is written in the background).
OUTCOME_WAIT_S = 10.0
# How long shutdown waits for usage rows of requests cut off by the server's own shutdown.
SETTLE_AT_SHUTDOWN_S = 5.0

CLIENT_CLOSED_REQUEST = 499
_logger = structlog.get_logger("gateway.request")


@dataclass(frozen=True, slots=True)
class GenerationOutcome:
    model: str
    endpoint: str
    status: UsageStatus
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    ttft_ms: float | None
    usage_recorded: bool
    requested_model: str
    """The model the request named; ``model`` is the one that served (a fallback, when they differ)."""
    replica: str | None = None
    """The remote worker that generated, for a model served by several."""
    prompt: str | None = None
    completion: str | list[str] | None = None

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "endpoint": self.endpoint,
            "outcome": self.status,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": str(self.cost_usd),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
        }
        if self.model != self.requested_model:
            fields["served_model"] = self.model
        if self.replica is not None:
            fields["replica"] = self.replica
        if not self.usage_recorded:
            fields["usage_recorded"] = False
        if self.prompt is not None:
            fields["prompt"] = self.prompt
            fields["completion"] = self.completion
        return fields


def _outcome(
    admission: AdmissionRequest, generation: Generation, status: UsageStatus, *, recorded: bool, content: bool
) -> GenerationOutcome:
    model, pricing = billed_as(admission, generation)
    reasons = sorted(set(generation.finish_reasons.values()))
    completion: str | list[str] | None = None
    if content:
        texts = ["".join(generation.texts.get(i, [])) for i in range(generation.n)]
        completion = texts[0] if generation.n == 1 else texts
    return GenerationOutcome(
        model=model,
        requested_model=admission.model,
        replica=generation.replica,
        endpoint=admission.endpoint,
        status=status,
        finish_reason=",".join(reasons) or None,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        cost_usd=cost(generation.prompt_tokens, pricing.input_per_million)
        + cost(generation.completion_tokens, pricing.output_per_million),
        ttft_ms=generation.ttft_ms(),
        usage_recorded=recorded,
        prompt=generation.runtime.tokenizer.decode(generation.prompt_ids) if content else None,
        completion=completion,
    )


class ObservedTicket:
    """The routes' ticket: the inner ticket's finish, observed once it is done.

    The observation is a callback on the inner ticket's own finishing future rather than a task
    of its own: it runs exactly once whatever happens to the callers, and the first call costs
    one task (the inner ticket's), not two.
    """

    def __init__(
        self,
        inner: Ticket,
        metrics: GatewayMetrics,
        admission: AdmissionRequest,
        *,
        log_content: bool,
        on_settled: Callable[[], None],
    ) -> None:
        self.settled = False
        self._on_settled = on_settled
        self._inner = inner
        self._metrics = metrics
        self._admission = admission
        self._log_content = log_content
        self._finishing: asyncio.Future[None] | None = None
        self.outcome: GenerationOutcome | None = None

    @property
    def headers(self) -> dict[str, str]:
        return self._inner.headers

    def finishing(self, generation: Generation, status: UsageStatus) -> asyncio.Future[None]:
        if self._finishing is None:
            finishing = self._inner.finishing(generation, status)
            self._finishing = finishing
            if finishing.done():
                self._observe(generation, status, finishing)  # finished at once (eagerly started)
            else:
                # Registered before any caller waits: the outcome is known before a waiter resumes.
                finishing.add_done_callback(functools.partial(self._observe, generation, status))
        return self._finishing

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        await asyncio.shield(self.finishing(generation, status))

    def _observe(self, generation: Generation, status: UsageStatus, finished: asyncio.Future[None]) -> None:
        try:
            recorded = not finished.cancelled() and finished.exception() is None
            outcome = _outcome(self._admission, generation, status, recorded=recorded, content=self._log_content)
            self.outcome = outcome
            metrics = self._metrics
            metrics.child(metrics.generations, outcome.model, status).inc()
            metrics.record_tokens(outcome.model, outcome.prompt_tokens, outcome.completion_tokens, outcome.cost_usd)
            ttft_s = None if outcome.ttft_ms is None else outcome.ttft_ms / 1000
            metrics.record_latencies(outcome.model, ttft_s, generation.token_gaps_s)
            metrics.record_backend_outcome(outcome.model, failed=status == "failed")
            if outcome.model != outcome.requested_model:
                metrics.fallbacks.labels(outcome.requested_model, outcome.model).inc()
        finally:
            self.settled = True
            self._on_settled()

    async def settled_outcome(self) -> GenerationOutcome | None:
        """The outcome, waiting a while for a finish that has begun."""
        if self._finishing is not None and not self._finishing.done():
            await asyncio.wait({self._finishing}, timeout=OUTCOME_WAIT_S)
        return self.outcome


class ObservedMetering:
    """Wraps the routes' metering so each generation's outcome reaches the metrics and the log."""

    def __init__(self, inner: Metering, metrics: GatewayMetrics, *, log_content: bool) -> None:
        self.inner = inner
        self._metrics = metrics
        self._log_content = log_content
        self._tickets: weakref.WeakSet[ObservedTicket] = weakref.WeakSet()
        self._a_ticket_settled = asyncio.Event()

    async def admit(self, admission: AdmissionRequest) -> Ticket:
        # Bound before admission, so a refusal's own log lines name the key and model too.
        structlog.contextvars.bind_contextvars(key_id=admission.key.id, model=admission.model)
        ticket = await self.inner.admit(admission)
        observed = ObservedTicket(
            ticket,
            self._metrics,
            admission,
            log_content=self._log_content,
            on_settled=self._a_ticket_settled.set,
        )
        self._tickets.add(observed)
        return observed

    async def settle(self) -> None:
        """Wait (a while) for the usage of admitted requests to be handed to accounting.

        At shutdown, requests that the server cut off record their usage from background tasks
        that may not have started yet; accounting must not close before they have.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_AT_SHUTDOWN_S):
                while any(not ticket.settled for ticket in self._tickets):
                    self._a_ticket_settled.clear()
                    await self._a_ticket_settled.wait()


class RequestObserver:
    """Middleware: log context, request metrics and the one log line of each request."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=scope["state"].get(REQUEST_ID_SCOPE_KEY))
        # Litestar answers every error itself, so a request that ends with no response begun was
        # left by its client: logged as 499, nginx's "client closed request", not as a failure.
        status = CLIENT_CLOSED_REQUEST

        async def observed_send(message: ASGIMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            await self._observe(scope, status, time.perf_counter() - started)

    async def _observe(self, scope: HTTPScope, status: int, duration_s: float) -> None:
        request_state = scope["state"]
        model: str = request_state.get(OBSERVED_MODEL_SCOPE_KEY, "")
        route = scope.get("path_template") or scope["path"]
        self.metrics.child(self.metrics.requests, route, scope["method"], model, str(status)).inc()
        ticket = request_state.get(OBSERVED_TICKET_SCOPE_KEY)
        outcome = await ticket.settled_outcome() if isinstance(ticket, ObservedTicket) else None
        if outcome is not None:
            self.metrics.child(self.metrics.e2e, outcome.model, outcome.endpoint).observe(duration_s)
        if scope["route_handler"].opt.get(PROBE):
            return
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round(duration_s * 1000, 1),
        }
        key = request_state.get(API_KEY_SCOPE_KEY)
        if isinstance(key, ApiKeyInfo):
            fields["key_id"] = key.id
        if model:
            fields["model"] = model
        if outcome is not None:
            fields.update(outcome.log_fields())
        if status >= 500:
            _logger.warning("request", **fields)
        else:
            _logger.info("request", **fields)
