"""Predictions in the SQL database, where every replica finds them.

The replica running a prediction (its ``runner``) writes its progress and end; every replica reads,
lists and asks for cancels. A runner renews ``heartbeat_at`` while it runs, so a prediction whose
runner died (a crash, a killed pod) is found by any replica and failed instead of running forever.
Webhook deliveries are written in the same transaction as the state they report (an outbox), so a
prediction's events are neither lost nor sent for a state that was never stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec
from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.api.replicate.predictions import TERMINAL, Page, Prediction
from gateway.db.tables import PredictionRecord, WebhookDelivery

UNFINISHED = ("starting", "processing")
RUNNER_GONE = "The server running this prediction stopped before it finished."
_encode = msgspec.json.Encoder().encode


def new_delivery_id() -> str:
    """The ``webhook-id`` of one delivery (the same on each of its retries)."""
    return "msg_" + secrets.token_urlsafe(18)


def _now() -> datetime:
    return datetime.now(UTC)


class PredictionRecords:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def insert(self, prediction: Prediction, runner: str) -> None:
        """Store a new prediction (``starting``) and give it its place in the list order."""
        now = _now()
        record = PredictionRecord(
            id=prediction.id,
            key_id=prediction.owner,
            model=prediction.model,
            version=prediction.version,
            input=prediction.input,
            status=prediction.status,
            output=[],
            error=None,
            metrics={},
            base_url=prediction.base_url,
            webhook=prediction.webhook,
            webhook_events=list(prediction.webhook_events),
            runner=runner,
            heartbeat_at=now,
            cancel_requested_at=None,
            created_at=prediction.created_at,
            started_at=None,
            completed_at=None,
        )
        async with self._sessionmaker.begin() as session:
            session.add(record)
            await session.flush()
            prediction.seq = record.seq

    async def get(self, prediction_id: str, owner: str) -> Prediction | None:
        async with self._sessionmaker() as session:
            record = await session.scalar(
                select(PredictionRecord).where(PredictionRecord.id == prediction_id, PredictionRecord.key_id == owner)
            )
            return None if record is None else Prediction.from_record(record)

    async def page(self, owner: str, *, before: int | None, after: int | None, size: int) -> Page:
        """The owner's predictions, newest first: the newest ``size`` older than ``before``, or the
        oldest ``size`` newer than ``after``, or the newest ``size`` of all."""
        mine = select(PredictionRecord).where(PredictionRecord.key_id == owner)
        if after is not None:
            query = mine.where(PredictionRecord.seq > after).order_by(PredictionRecord.seq.asc())
        else:
            if before is not None:
                mine = mine.where(PredictionRecord.seq < before)
            query = mine.order_by(PredictionRecord.seq.desc())
        async with self._sessionmaker() as session:
            records = list(await session.scalars(query.limit(size)))
            if after is not None:
                records.reverse()
            if not records:
                return Page([], None, None)
            newest, oldest = records[0].seq, records[-1].seq
            owned = PredictionRecord.key_id == owner
            has_older = await session.scalar(select(exists().where(owned, PredictionRecord.seq < oldest)))
            has_newer = await session.scalar(select(exists().where(owned, PredictionRecord.seq > newest)))
        results = [Prediction.from_record(r) for r in records]
        return Page(results, oldest if has_older else None, newest if has_newer else None)

    async def save_progress(self, prediction: Prediction, runner: str, events: Sequence[str]) -> None:
        """Write a running prediction's status and output so far, with the webhooks they owe."""
        async with self._sessionmaker.begin() as session:
            stored = await session.execute(
                update(PredictionRecord)
                .where(PredictionRecord.id == prediction.id, PredictionRecord.status.in_(UNFINISHED))
                .values(
                    status=prediction.status if prediction.status not in TERMINAL else "processing",
                    started_at=prediction.started_at,
                    output=list(prediction.output),
                    runner=runner,
                    heartbeat_at=_now(),
                )
            )
            if stored.rowcount:  # type: ignore[attr-defined]
                self._enqueue(session, prediction, events)

    async def finish(self, prediction: Prediction) -> bool:
        """Write a prediction's end and its ``completed`` webhook; False if it had ended already
        (failed by another replica that took its runner for gone)."""
        async with self._sessionmaker.begin() as session:
            stored = await session.execute(
                update(PredictionRecord)
                .where(PredictionRecord.id == prediction.id, PredictionRecord.status.in_(UNFINISHED))
                .values(
                    status=prediction.status,
                    error=prediction.error,
                    output=list(prediction.output),
                    metrics=dict(prediction.metrics),
                    started_at=prediction.started_at,
                    completed_at=prediction.completed_at,
                    heartbeat_at=_now(),
                )
            )
            if not stored.rowcount:  # type: ignore[attr-defined]
                return False
            self._enqueue(session, prediction, ["completed"], ended=True)
            return True

    def _enqueue(
        self, session: AsyncSession, prediction: Prediction, events: Iterable[str], *, ended: bool = False
    ) -> None:
        if prediction.webhook is None:
            return
        wanted = [event for event in events if prediction.wants(event)]
        if not wanted:
            return
        # The body is the state being stored now, exactly as it will be signed and sent.
        body = _encode(prediction.to_json(concluded=ended)).decode()
        now = _now()
        for event in wanted:
            session.add(
                WebhookDelivery(
                    id=new_delivery_id(),
                    prediction_id=prediction.id,
                    key_id=prediction.owner,
                    event=event,
                    url=prediction.webhook,
                    body=body,
                    attempts=0,
                    next_attempt_at=now,
                    last_error=None,
                    created_at=now,
                    delivered_at=None,
                    abandoned_at=None,
                )
            )

    async def request_cancel(self, prediction_id: str, owner: str) -> bool:
        """Ask the prediction's runner, wherever it is, to cancel it; False if it has ended."""
        async with self._sessionmaker.begin() as session:
            asked = await session.execute(
                update(PredictionRecord)
                .where(
                    PredictionRecord.id == prediction_id,
                    PredictionRecord.key_id == owner,
                    PredictionRecord.status.in_(UNFINISHED),
                )
                .values(cancel_requested_at=func.coalesce(PredictionRecord.cancel_requested_at, _now()))
            )
            return bool(asked.rowcount)  # type: ignore[attr-defined]

    async def cancels_asked(self, ids: Iterable[str]) -> list[str]:
        """Which of these (running here) another replica asked to cancel."""
        wanted = list(ids)
        if not wanted:
            return []
        async with self._sessionmaker() as session:
            found = await session.scalars(
                select(PredictionRecord.id).where(
                    PredictionRecord.id.in_(wanted), PredictionRecord.cancel_requested_at.is_not(None)
                )
            )
            return list(found)

    async def heartbeat(self, runner: str, ids: Iterable[str]) -> None:
        wanted = list(ids)
        if not wanted:
            return
        async with self._sessionmaker.begin() as session:
            await session.execute(
                update(PredictionRecord)
                .where(PredictionRecord.id.in_(wanted), PredictionRecord.status.in_(UNFINISHED))
                .values(heartbeat_at=_now(), runner=runner)
            )

    async def fail_orphans(self, stale_after: timedelta) -> list[str]:
        """Fail unfinished predictions whose runner has not renewed them within ``stale_after``."""
        cutoff = _now() - stale_after
        failed: list[str] = []
        async with self._sessionmaker.begin() as session:
            stale = await session.scalars(
                select(PredictionRecord)
                .where(PredictionRecord.status.in_(UNFINISHED), PredictionRecord.heartbeat_at < cutoff)
                .limit(100)
            )
            for record in list(stale):
                prediction = Prediction.from_record(record)
                prediction.status, prediction.error, prediction.completed_at = "failed", RUNNER_GONE, _now()
                taken = await session.execute(
                    update(PredictionRecord)
                    .where(
                        PredictionRecord.id == record.id,
                        PredictionRecord.status.in_(UNFINISHED),
                        PredictionRecord.heartbeat_at < cutoff,
                    )
                    .values(status="failed", error=RUNNER_GONE, completed_at=prediction.completed_at)
                )
                if taken.rowcount:  # type: ignore[attr-defined]
                    self._enqueue(session, prediction, ["completed"], ended=True)
                    failed.append(record.id)
        return failed

    async def purge(self, older_than: timedelta) -> int:
        """Delete ended predictions (and their settled deliveries) that ended before the cut-off."""
        cutoff = _now() - older_than
        async with self._sessionmaker.begin() as session:
            old = select(PredictionRecord.id).where(
                PredictionRecord.status.in_(TERMINAL), PredictionRecord.completed_at < cutoff
            )
            await session.execute(
                delete(WebhookDelivery).where(
                    WebhookDelivery.prediction_id.in_(old),
                    or_(WebhookDelivery.delivered_at.is_not(None), WebhookDelivery.abandoned_at.is_not(None)),
                )
            )
            pending = select(WebhookDelivery.prediction_id).where(
                WebhookDelivery.delivered_at.is_(None), WebhookDelivery.abandoned_at.is_(None)
            )
            removed = await session.execute(
                delete(PredictionRecord).where(PredictionRecord.id.in_(old), PredictionRecord.id.not_in(pending))
            )
            return int(removed.rowcount)  # type: ignore[attr-defined]
