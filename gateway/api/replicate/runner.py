"""Predictions run as tasks of their own, so they outlive the request that created them.

Every run ends in exactly one ``Ticket.finish`` (completed, length, stopped, cancelled or failed), and
the usage row is committed before the prediction's end is stored and shown: a client that saw
``succeeded`` or ``canceled`` finds the row already there, on any replica.

Beside each run a writer stores its progress at most every ``PROGRESS_INTERVAL_S`` (one write for
all the pieces produced meanwhile, never a wait in the generation loop). The service's watcher asks
the database every ``CANCEL_POLL_S`` whether another replica asked to cancel one of its runs, renews
their heartbeats, fails predictions whose runner stopped renewing them (``runner_timeout``), and
deletes ended predictions older than the retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta

from litestar import Litestar

from backends.base import BackendError
from gateway.accounting.metering import Ticket, usage_status
from gateway.accounting.usage import UsageStatus
from gateway.api.replicate.predictions import Page, Prediction, PredictionStatus
from gateway.api.replicate.records import PredictionRecords
from gateway.api.replicate.webhooks import WebhookSecrets, WebhookSender
from gateway.serving.generation import Generation
from gateway.state import STATE_KEY, GatewayState

logger = logging.getLogger(__name__)

SERVICE_KEY = "replicate_predictions"
CANCEL_WAIT_SECONDS = 10.0
PROGRESS_INTERVAL_S = 0.25
CANCEL_POLL_S = 0.25
HEARTBEATS_PER_TIMEOUT = 6
MAX_HOUSEKEEPING_S = 10.0
FINAL_WRITE_ATTEMPTS = 3
BACKEND_FAILED = "The model failed while generating; please retry."
UNRECORDED = "The prediction's usage could not be recorded."


class PredictionService:
    """The predictions of one app: its own runs, and the database every replica shares."""

    def __init__(
        self,
        records: PredictionRecords,
        webhook_secrets: WebhookSecrets,
        sender: WebhookSender | None = None,
        *,
        retention: timedelta = timedelta(hours=24),
        runner_timeout: timedelta = timedelta(seconds=30),
    ) -> None:
        self.records = records
        self.webhook_secrets = webhook_secrets
        self.runner = uuid.uuid4().hex
        """This replica's id in the ``runner`` column (a new one per process)."""
        self._sender = sender
        self._retention = retention
        self._runner_timeout = runner_timeout
        self._live: dict[str, Prediction] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        return len(self._runs) + len(self._settling)

    def open(self) -> None:
        """Start the watcher and the webhook sender (the app's startup)."""
        if self._sender is not None:
            self._sender.start()
        self._watcher = asyncio.create_task(self._watch(), name="prediction watcher")

    async def create(self, prediction: Prediction) -> None:
        """Store a new prediction; it is then visible to every replica."""
        await self.records.insert(prediction, self.runner)

    def start(self, prediction: Prediction, generation: Generation, ticket: Ticket) -> None:
        self._live[prediction.id] = prediction
        run = asyncio.create_task(self._run(prediction, generation, ticket), name=f"prediction {prediction.id}")
        self._runs[prediction.id] = run

        def ended(_: asyncio.Task[None]) -> None:
            self._runs.pop(prediction.id, None)
            if not prediction.done and prediction.id in self._live:
                # Cancelled before its first step, so its own handler never ran: settle it here.
                settle = asyncio.create_task(self._settle(prediction, generation, ticket, "cancelled"))
                self._settling.add(settle)
                settle.add_done_callback(self._settling.discard)

        run.add_done_callback(ended)

    def runs_here(self, prediction: Prediction) -> bool:
        """Whether ``prediction`` is the live state of a run of this replica."""
        return self._live.get(prediction.id) is prediction

    async def get(self, prediction_id: str, owner: str) -> Prediction | None:
        """The live prediction where it runs here, else the stored one."""
        live = self._live.get(prediction_id)
        if live is not None and live.owner == owner:
            return live
        return await self.records.get(prediction_id, owner)

    async def page(self, owner: str, *, before: int | None, after: int | None, size: int) -> Page:
        return await self.records.page(owner, before=before, after=after, size=size)

    async def cancel(self, prediction: Prediction) -> Prediction:
        """Stop a prediction wherever it runs and wait (briefly) until it shows its end; the
        prediction as it is then."""
        run = self._runs.get(prediction.id)
        if run is not None:
            run.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                    await asyncio.wait({run})  # returns when it ends, without raising its CancelledError
                    await prediction.wait_done()  # settled by ``ended`` if cancelled before its first step
            return prediction
        if prediction.done or not await self.records.request_cancel(prediction.id, prediction.owner):
            return await self.records.get(prediction.id, prediction.owner) or prediction
        # Another replica runs it: its watcher sees the request and cancels; wait for the stored end.
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            current = await self.records.get(prediction.id, prediction.owner)
            if current is None or current.done:
                return current or prediction
            await asyncio.sleep(CANCEL_POLL_S)
        return await self.records.get(prediction.id, prediction.owner) or prediction

    async def aclose(self) -> None:
        """Cancel every running prediction and wait for their usage rows (at shutdown)."""
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.gather(*self._settling, return_exceptions=True)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._sender is not None:
            await self._sender.aclose()

    async def _run(self, prediction: Prediction, generation: Generation, ticket: Ticket) -> None:
        prediction.start()
        writer = asyncio.create_task(self._write_progress(prediction), name=f"prediction {prediction.id} progress")
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    if event.text:
                        prediction.append(event.text)
        except asyncio.CancelledError:
            await self._settle(prediction, generation, ticket, "cancelled", writer)
            raise
        except BackendError:
            await self._settle(prediction, generation, ticket, "failed", writer)
        except Exception:
            logger.exception("prediction %s failed", prediction.id)
            await self._settle(prediction, generation, ticket, "failed", writer)
        else:
            await self._settle(prediction, generation, ticket, usage_status(generation), writer)

    async def _settle(
        self,
        prediction: Prediction,
        generation: Generation,
        ticket: Ticket,
        outcome: UsageStatus,
        writer: asyncio.Task[None] | None = None,
    ) -> None:
        if writer is not None:
            # No progress write may land after (or race with) the final one.
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        statuses: dict[UsageStatus, PredictionStatus] = {"cancelled": "canceled", "failed": "failed"}
        status = statuses.get(outcome, "succeeded")
        error = BACKEND_FAILED if outcome == "failed" else None
        try:
            await ticket.finish(generation, outcome)
        except Exception:
            logger.exception("usage of prediction %s was not recorded", prediction.id)
            status, error = "failed", UNRECORDED
        finally:
            generation.release_unused_slots()
            prediction.conclude(status, generation, error)
            await self._store_end(prediction)
            self._live.pop(prediction.id, None)
            prediction.announce_end()

    async def _store_end(self, prediction: Prediction) -> None:
        for attempt in range(1, FINAL_WRITE_ATTEMPTS + 1):
            try:
                await asyncio.shield(self.records.finish(prediction))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "prediction %s: its end could not be stored (attempt %d): %s",
                    prediction.id,
                    attempt,
                    str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(0.2 * attempt)
            else:
                if self._sender is not None:
                    self._sender.wake()
                return
        # Its heartbeat stops now, so another replica fails it after the runner timeout; the usage row is stored.
        logger.error("prediction %s: its end was not stored", prediction.id)

    async def _write_progress(self, prediction: Prediction) -> None:
        sent_start = False
        written = 0
        seen = -1
        while True:
            if prediction.changes == seen:
                await prediction.changed()
            await asyncio.sleep(PROGRESS_INTERVAL_S)  # one write for everything produced meanwhile
            seen = prediction.changes
            events = [] if sent_start else ["start"]
            if len(prediction.output) > written:
                events.append("output")
            try:
                await self.records.save_progress(prediction, self.runner, events)
            except Exception as exc:
                logger.warning("prediction %s: progress not stored: %s", prediction.id, str(exc) or type(exc).__name__)
                continue
            sent_start = True
            written = len(prediction.output)
            if events and self._sender is not None and any(prediction.wants(e) for e in events):
                self._sender.wake()

    async def _watch(self) -> None:
        last_beat = last_housekeeping = time.monotonic()
        heartbeat_s = self._runner_timeout.total_seconds() / HEARTBEATS_PER_TIMEOUT
        housekeeping_s = min(MAX_HOUSEKEEPING_S, self._runner_timeout.total_seconds() / 2)
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                for prediction_id in await self.records.cancels_asked(list(self._runs)):
                    if (run := self._runs.get(prediction_id)) is not None:
                        run.cancel()
                now = time.monotonic()
                if now - last_beat >= heartbeat_s:
                    last_beat = now
                    await self.records.heartbeat(self.runner, list(self._runs))
                if now - last_housekeeping >= housekeeping_s:
                    last_housekeeping = now
                    if await self.records.fail_orphans(self._runner_timeout) and self._sender is not None:
                        self._sender.wake()
                    await self.records.purge(self._retention)
            except Exception as exc:  # the database may be away for a while: runs go on, so does this
                logger.warning("prediction watcher: %s", str(exc) or type(exc).__name__)


def prediction_service(app: Litestar) -> PredictionService:
    """The app's prediction service, made on first use."""
    service = app.state.get(SERVICE_KEY)
    if service is None:
        state: GatewayState = app.state[STATE_KEY]
        sessionmaker = state.accounting.sessionmaker
        secrets_store = WebhookSecrets(sessionmaker)
        service = PredictionService(
            PredictionRecords(sessionmaker),
            secrets_store,
            WebhookSender(sessionmaker, secrets_store),
            retention=timedelta(hours=state.settings.prediction_retention_hours),
            runner_timeout=timedelta(seconds=state.settings.prediction_runner_timeout_s),
        )
        app.state[SERVICE_KEY] = service
    assert isinstance(service, PredictionService)
    return service


async def open_predictions(app: Litestar) -> None:
    """For the app's startup, once accounting is open: start the watcher and the webhook sender."""
    prediction_service(app).open()


async def close_predictions(app: Litestar) -> None:
    """For the app's shutdown, before backends stop and accounting closes: cancel and settle every run."""
    service = app.state.get(SERVICE_KEY)
    if isinstance(service, PredictionService):
        await service.aclose()
