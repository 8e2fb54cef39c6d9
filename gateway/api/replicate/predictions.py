"""Predictions held in memory by the replica that runs them.

Each prediction belongs to the API key that created it; other keys cannot see it (they get 404, as
for an id that never existed). Finished predictions are kept for ``RETENTION_SECONDS`` and at most
``MAX_FINISHED`` of them; running ones are never dropped. A replica knows only its own predictions:
behind a load balancer, poll and stream through the replica that answered the create (sticky
sessions), as the usage rows in the shared database are the durable record.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.serving.generation import Generation

PredictionStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[PredictionStatus] = frozenset({"succeeded", "failed", "canceled"})

RETENTION_SECONDS = 3600.0
MAX_FINISHED = 1000
PAGE_SIZE = 100


def new_prediction_id() -> str:
    """26 lowercase base32 characters (128 random bits), the shape of Replicate's ids."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def _timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


@dataclass(eq=False)
class Prediction:
    id: str
    seq: int
    owner: str
    """The id of the API key that created it."""
    model: str
    version: str
    input: dict[str, Any]
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: PredictionStatus = "starting"
    output: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)
    finished_monotonic: float | None = None
    _started_monotonic: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def _notify(self) -> None:
        # Waiters hold the event they saw; a fresh one serves the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Return at the next change: a piece of output or the end."""
        await self._changed.wait()

    async def wait_done(self) -> None:
        await self._finished.wait()

    def start(self) -> None:
        self.status = "processing"
        self.started_at = datetime.now(UTC)
        self._started_monotonic = time.monotonic()
        self._notify()

    def append(self, text: str) -> None:
        self.output.append(text)
        self._notify()

    def finish(self, status: PredictionStatus, generation: Generation, error: str | None = None) -> None:
        now = time.monotonic()
        started = self._started_monotonic if self._started_monotonic is not None else now
        predict_time = now - started
        metrics: dict[str, int | float] = {
            "input_token_count": generation.prompt_tokens,
            "output_token_count": generation.completion_tokens,
            "predict_time": round(predict_time, 6),
        }
        if generation.first_token_at is not None:
            metrics["time_to_first_token"] = round(max(0.0, generation.first_token_at - started), 6)
        if predict_time > 0:
            metrics["tokens_per_second"] = round(generation.completion_tokens / predict_time, 3)
        self.metrics = metrics
        self.status = status
        self.error = error
        self.completed_at = datetime.now(UTC)
        self.finished_monotonic = now
        self._finished.set()
        self._notify()

    def to_json(self, base_url: str, *, pending_as: PredictionStatus | None = None) -> dict[str, Any]:
        """Replicate's prediction object. ``pending_as`` overrides the status of an unfinished one."""
        url = f"{base_url.rstrip('/')}/v1/predictions/{self.id}"
        status = pending_as if pending_as is not None and not self.done else self.status
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "output": None if self.status == "starting" else list(self.output),
            "error": self.error,
            "logs": "",
            "status": status,
            "source": "api",
            "data_removed": False,
            "created_at": _timestamp(self.created_at),
            "started_at": _timestamp(self.started_at),
            "completed_at": _timestamp(self.completed_at),
            "metrics": dict(self.metrics),
            "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
        }


@dataclass(frozen=True, slots=True)
class Page:
    results: list[Prediction]
    next_before: int | None
    """Cursor position for older predictions, if any."""
    previous_after: int | None
    """Cursor position for newer predictions, if any."""


class PredictionStore:
    def __init__(self, *, retention_seconds: float = RETENTION_SECONDS, max_finished: int = MAX_FINISHED) -> None:
        self._by_id: dict[str, Prediction] = {}
        self._seq = 0
        self._retention = retention_seconds
        self._max_finished = max_finished

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self._by_id.values())

    def add(self, *, owner: str, model: str, version: str, input: dict[str, Any]) -> Prediction:
        self._evict()
        self._seq += 1
        prediction = Prediction(new_prediction_id(), self._seq, owner, model, version, input)
        self._by_id[prediction.id] = prediction
        return prediction

    def get(self, prediction_id: str, owner: str) -> Prediction | None:
        prediction = self._by_id.get(prediction_id)
        if prediction is None or prediction.owner != owner:
            return None
        return prediction

    def page(self, owner: str, *, before: int | None = None, after: int | None = None, size: int = PAGE_SIZE) -> Page:
        """The owner's predictions, newest first: the newest ``size`` older than ``before``, or the
        oldest ``size`` newer than ``after``, or the newest ``size`` of all."""
        mine = [p for p in reversed(self._by_id.values()) if p.owner == owner]
        if after is not None:
            newer = [p for p in mine if p.seq > after]
            results = newer[-size:]
        else:
            results = [p for p in mine if before is None or p.seq < before][:size]
        if not results:
            return Page([], None, None)
        oldest, newest = results[-1].seq, results[0].seq
        has_older = any(p.seq < oldest for p in mine)
        has_newer = any(p.seq > newest for p in mine)
        return Page(results, oldest if has_older else None, newest if has_newer else None)

    def _evict(self) -> None:
        """Drop expired finished predictions, and the oldest finished ones beyond the cap (one is added)."""
        now = time.monotonic()
        finished = sorted(
            ((p.finished_monotonic, p) for p in self._by_id.values() if p.finished_monotonic is not None),
            key=lambda item: item[0],
        )
        over_cap = len(finished) - max(0, self._max_finished - 1)
        for index, (finished_at, prediction) in enumerate(finished):
            if index < over_cap or now - finished_at > self._retention:
                del self._by_id[prediction.id]
