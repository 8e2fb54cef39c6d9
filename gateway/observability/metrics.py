"""Prometheus metrics, correct under several uvicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``serve --workers N`` points it at a fresh temporary
directory when the operator did not), each worker writes its samples to files there and a scrape,
whichever worker answers it, reads all of them: counters and histograms add up over every worker
that ever ran, live gauges (queue depth, running requests, usage backlog) add up over the workers
alive, health gauges report the most recent value any worker wrote. Without it the metrics live
in the process.

Values owned by other objects (slot queues, the usage writer) are copied into gauges when
``/metrics`` is scraped and, under several workers, every second, so a scrape answered by one
worker sees the others' recent values too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Set
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llama_gateway_requests",
            "HTTP requests answered, by route template, model (empty when none) and status code.",
            ["route", "method", "model", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "llama_gateway_requests_in_flight",
            "HTTP requests being served, streams included.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "llama_gateway_time_to_first_token_seconds",
            "From admission (queueing included) to the first generated token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llama_gateway_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a choice.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "llama_gateway_request_duration_seconds",
            "End-to-end latency of generation requests, from arrival to the last byte sent.",
            ["model", "endpoint"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("llama_gateway_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter(
            "llama_gateway_completion_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.cost = Counter(
            "llama_gateway_cost_usd",
            "USD charged for requests (the usage rows hold the exact amounts).",
            ["model"],
            registry=r,
        )
        self.generations = Counter(
            "llama_gateway_generations",
            "Generations by outcome: completed, stopped, length, cancelled or failed.",
            ["model", "status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "llama_gateway_queue_depth",
            "Requests waiting for a generation slot.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.running = Gauge(
            "llama_gateway_running_requests",
            "Generations holding a slot of the model's backend.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.usage_backlog = Gauge(
            "llama_gateway_usage_backlog",
            "Usage rows waiting for their commit.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.usage_failures = Counter(
            "llama_gateway_usage_write_failures",
            "Usage-row transactions that failed (each one retried or reported).",
            registry=r,
        )
        self.usage_rejected = Counter(
            "llama_gateway_usage_rows_rejected",
            "Usage rows given up on after retries: requests whose usage is missing.",
            registry=r,
        )
        self.usage_spooled = Counter(
            "llama_gateway_usage_rows_spooled",
            "Usage rows written to the local spool because the database was out of reach.",
            registry=r,
        )
        self.usage_replayed = Counter(
            "llama_gateway_usage_rows_replayed",
            "Spooled usage rows committed to the database once it answered again.",
            registry=r,
        )
        self.usage_spool_bytes = Gauge(
            "llama_gateway_usage_spool_bytes",
            "Size of the local usage spool (every worker's): rows waiting for the database.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.database_up = Gauge(
            "llama_gateway_database_up",
            "1 when the database answered the latest check.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.backend_up = Gauge(
            "llama_gateway_backend_up",
            "1 when the model's backend is started, its engine can serve, and its latest generation did not fail.",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.engine_exits = Counter(
            "llama_gateway_engine_exits",
            "Engine processes of the model that ended while serving; each is started again.",
            ["model"],
            registry=r,
        )
        self.fallbacks = Counter(
            "llama_gateway_model_fallbacks",
            "Requests served by a fallback model because the requested model failed before its first token.",
            ["model", "served_model"],
            registry=r,
        )
        self.replica_served = Counter(
            "llama_gateway_replica_generations",
            "Generations a remote worker replica started (it sent their first token).",
            ["model", "replica"],
            registry=r,
        )
        self.replica_skipped = Counter(
            "llama_gateway_replica_skips",
            "Generations moved off a remote worker replica before their first token, by reason.",
            ["model", "replica", "reason"],
            registry=r,
        )
        self.replica_in_rotation = Gauge(
            "llama_gateway_replica_in_rotation",
            "1 while a remote worker replica is in rotation, 0 while it is out after failures.",
            ["model", "replica"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.draining = Gauge(
            "llama_gateway_draining",
            "1 while shutting down: new requests are refused, running ones finish.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._copied: dict[str, int] = {}
        self._failing_backends: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: _Metric, *values: str) -> _Metric:
        """``metric.labels(*values)``, remembered: every request records about ten labelled
        samples, and ``labels`` checks and converts its values and takes a lock each time."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def record_tokens(self, model: str, prompt_tokens: int, completion_tokens: int, cost_usd: Decimal) -> None:
        self.child(self.prompt_tokens, model).inc(prompt_tokens)
        self.child(self.completion_tokens, model).inc(completion_tokens)
        self.child(self.cost, model).inc(float(cost_usd))

    def record_latencies(self, model: str, ttft_s: float | None, token_gaps_s: list[float]) -> None:
        if ttft_s is not None:
            self.child(self.ttft, model).observe(ttft_s)
        itl = self.child(self.itl, model)
        for gap in token_gaps_s:
            itl.observe(gap)

    def record_backend_outcome(self, model: str, *, failed: bool) -> None:
        if failed:
            self._failing_backends.add(model)
        else:
            self._failing_backends.discard(model)

    def set_backends(self, models: list[str], *, started: bool, unable: Set[str] = frozenset()) -> None:
        """``unable``: models whose backend cannot serve now (an engine process starting again)."""
        for model in models:
            up = started and model not in unable and model not in self._failing_backends
            self.backend_up.labels(model).set(1 if up else 0)

    def copy_total(self, counter: Counter, name: str, total: int) -> None:
        """Advance ``counter`` to an owner's running total (counted since this process started)."""
        delta = total - self._copied.get(name, 0)
        if delta > 0:
            counter.inc(delta)
            self._copied[name] = total

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape, in the format its ``Accept`` header asks for."""
        registry = self.registry
        if multiprocess_enabled():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type


class ReplicaMetrics:
    """What one model's backend reports about its replicas, as metrics (a ``ReplicaObserver``)."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model

    def served(self, replica: str) -> None:
        self._metrics.replica_served.labels(self._model, replica).inc()

    def skipped(self, replica: str, reason: str) -> None:
        self._metrics.replica_skipped.labels(self._model, replica, reason).inc()

    def rotation(self, replica: str, *, in_rotation: bool) -> None:
        self._metrics.replica_in_rotation.labels(self._model, replica).set(1 if in_rotation else 0)


def forget_this_process() -> None:
    """Drop this worker's live gauges when it stops (multiprocess mode only)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def multiprocess_directory(workers: int) -> Iterator[None]:
    """Around ``serve``: the shared metrics directory that several workers need.

    An operator's ``PROMETHEUS_MULTIPROC_DIR`` is emptied of a previous run's files; with several
    workers and none set, a temporary one is made and removed afterwards.
    """
    configured = os.environ.get(MULTIPROC_ENV)
    if configured:
        directory = Path(configured)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        yield
        return
    if workers <= 1:
        yield
        return
    created = tempfile.mkdtemp(prefix="llama-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = created
    try:
        yield
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(created, ignore_errors=True)
