"""Predictions run as tasks of their own, so they outlive the request that created them.

Every run ends in exactly one ``Ticket.finish`` (completed, length, stopped, cancelled or failed), and
the usage row is committed before the prediction shows its final status: a client that saw
``succeeded`` or ``canceled`` finds the row already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from litestar import Litestar

from backends.base import BackendError
from gateway.accounting.metering import Ticket, usage_status
from gateway.accounting.usage import UsageStatus
from gateway.api.replicate.predictions import Prediction, PredictionStatus, PredictionStore
from gateway.serving.generation import Generation

logger = logging.getLogger(__name__)

SERVICE_KEY = "replicate_predictions"
CANCEL_WAIT_SECONDS = 10.0
BACKEND_FAILED = "The model failed while generating; please retry."
UNRECORDED = "The prediction's usage could not be recorded."


async def _settle(prediction: Prediction, generation: Generation, ticket: Ticket, outcome: UsageStatus) -> None:
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
        prediction.finish(status, generation, error)


async def run_prediction(prediction: Prediction, generation: Generation, ticket: Ticket) -> None:
    prediction.start()
    try:
        async with contextlib.aclosing(generation.events()) as events:
            async for event in events:
                if event.text:
                    prediction.append(event.text)
    except asyncio.CancelledError:
        await _settle(prediction, generation, ticket, "cancelled")
        raise
    except BackendError:
        await _settle(prediction, generation, ticket, "failed")
    except Exception:
        logger.exception("prediction %s failed", prediction.id)
        await _settle(prediction, generation, ticket, "failed")
    else:
        await _settle(prediction, generation, ticket, usage_status(generation))


class PredictionService:
    """The predictions of one app and the tasks running them."""

    def __init__(self, store: PredictionStore | None = None) -> None:
        self.store = store or PredictionStore()
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._settling: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return len(self._runs) + len(self._settling)

    def start(self, prediction: Prediction, generation: Generation, ticket: Ticket) -> None:
        run = asyncio.create_task(run_prediction(prediction, generation, ticket), name=f"prediction {prediction.id}")
        self._runs[prediction.id] = run

        def ended(_: asyncio.Task[None]) -> None:
            self._runs.pop(prediction.id, None)
            if not prediction.done:
                # Cancelled before its first step, so its own handler never ran: settle it here.
                settle = asyncio.create_task(_settle(prediction, generation, ticket, "cancelled"))
                self._settling.add(settle)
                settle.add_done_callback(self._settling.discard)

        run.add_done_callback(ended)

    async def cancel(self, prediction: Prediction) -> None:
        """Stop a running prediction and wait (briefly) until its usage is recorded and it shows canceled."""
        run = self._runs.get(prediction.id)
        if run is None:
            return
        run.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                await asyncio.wait({run})  # returns when it ends, without raising its CancelledError
                await prediction.wait_done()  # settled by ``ended`` if it was cancelled before its first step

    async def aclose(self) -> None:
        """Cancel every running prediction and wait for their usage rows (at shutdown)."""
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.gather(*self._settling, return_exceptions=True)


def prediction_service(app: Litestar) -> PredictionService:
    """The app's prediction service, made on first use."""
    service = app.state.get(SERVICE_KEY)
    if service is None:
        service = PredictionService()
        app.state[SERVICE_KEY] = service
    assert isinstance(service, PredictionService)
    return service


async def close_predictions(app: Litestar) -> None:
    """For the app's shutdown, before backends stop and accounting closes: cancel and settle every run."""
    service = app.state.get(SERVICE_KEY)
    if isinstance(service, PredictionService):
        await service.aclose()
