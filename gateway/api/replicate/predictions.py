"""A prediction's state: live on the replica that runs it, read back from the database elsewhere.

The database (``records``) is what every replica shares: a prediction created on one replica is
read, listed, cancelled and streamed through any other, and outlives restarts. The replica that
runs a prediction keeps its live ``Prediction`` too, so its own readers see each piece of output
as it is produced; the database follows at most ``records.PROGRESS_INTERVAL_S`` behind.

Each prediction belongs to the API key that created it; other keys cannot see it (they get 404, as
for an id that never existed).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

from gateway.db.tables import PredictionRecord
from gateway.serving.generation import Generation

PredictionStatus = Literal["starting", "processing", "succeeded", "failed", "canceled"]
TERMINAL: frozenset[PredictionStatus] = frozenset({"succeeded", "failed", "canceled"})

PAGE_SIZE = 100
WEBHOOK_EVENTS: tuple[str, ...] = ("start", "output", "logs", "completed")
"""Replicate's ``webhook_events_filter`` values; "logs" is accepted, but this server writes no logs."""


def new_prediction_id() -> str:
    """26 lowercase base32 characters (128 random bits), the shape of Replicate's ids."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def _timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


@dataclass(eq=False)
class Prediction:
    id: str
    owner: str
    """The id of the API key that created it."""
    model: str
    version: str
    input: dict[str, Any]
    base_url: str
    """The gateway's address as the creating client saw it; ``urls`` are built on it."""
    webhook: str | None = None
    webhook_events: tuple[str, ...] = WEBHOOK_EVENTS
    seq: int = 0
    """Creation order in the database (list cursors); 0 until stored."""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: PredictionStatus = "starting"
    output: list[str] = field(default_factory=list)
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)
    changes: int = 0
    """Counts changes, so a reader that was busy can tell it missed one."""
    _started_monotonic: float | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_record(cls, record: PredictionRecord) -> Prediction:
        """A snapshot as stored: it does not change after it is read."""
        prediction = cls(
            id=record.id,
            owner=record.key_id,
            model=record.model,
            version=record.version,
            input=dict(record.input),
            base_url=record.base_url,
            webhook=record.webhook,
            webhook_events=tuple(record.webhook_events),
            seq=record.seq,
            created_at=record.created_at,
            status=cast(PredictionStatus, record.status),
            output=list(record.output),
            error=record.error,
            started_at=record.started_at,
            completed_at=record.completed_at,
            metrics=dict(record.metrics),
        )
        if prediction.status in TERMINAL:
            prediction._finished.set()
        return prediction

    @property
    def done(self) -> bool:
        """Ended and settled: its usage row and its final state are stored."""
        return self._finished.is_set()

    def wants(self, event: str) -> bool:
        """Whether a webhook is owed for ``event``."""
        return self.webhook is not None and event in self.webhook_events

    def _notify(self) -> None:
        # Waiters hold the event they saw; a fresh one serves the next change.
        self.changes += 1
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

    def conclude(self, status: PredictionStatus, generation: Generation, error: str | None = None) -> None:
        """Fill in the outcome; readers see it only once ``announce_end`` is called (after it is stored)."""
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

    def announce_end(self) -> None:
        self._finished.set()
        self._notify()

    def finish(self, status: PredictionStatus, generation: Generation, error: str | None = None) -> None:
        self.conclude(status, generation, error)
        self.announce_end()

    def to_json(self, *, pending_as: PredictionStatus | None = None, concluded: bool = False) -> dict[str, Any]:
        """Replicate's prediction object. ``pending_as`` overrides the status of an unfinished one;
        ``concluded`` shows a concluded end before it is announced (the state being stored)."""
        url = f"{self.base_url.rstrip('/')}/v1/predictions/{self.id}"
        status, error, completed_at, metrics = self.status, self.error, self.completed_at, self.metrics
        if not self.done and not concluded:
            if status in TERMINAL:
                # A concluded run shows its end once that is stored (``announce_end``), not before.
                status, error, completed_at, metrics = "processing", None, None, {}
            status = pending_as or status
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "output": None if self.status == "starting" else list(self.output),
            "error": error,
            "logs": "",
            "status": status,
            "source": "api",
            "data_removed": False,
            "created_at": _timestamp(self.created_at),
            "started_at": _timestamp(self.started_at),
            "completed_at": _timestamp(completed_at),
            "metrics": dict(metrics),
            "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream"},
            "webhook": self.webhook,
            "webhook_events_filter": list(self.webhook_events) if self.webhook else None,
        }


@dataclass(frozen=True, slots=True)
class Page:
    results: list[Prediction]
    next_before: int | None
    """Cursor position for older predictions, if any."""
    previous_after: int | None
    """Cursor position for newer predictions, if any."""
