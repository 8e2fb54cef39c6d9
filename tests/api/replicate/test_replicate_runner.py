from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backends.base import BackendCapabilities, GenerationFailed, GenerationRequest, SamplingParams, TokenDelta
from backends.scripted import ScriptedBackend
from gateway.accounting.metering import FinishOnce
from gateway.accounting.usage import UsageStatus
from gateway.api.replicate.predictions import Prediction
from gateway.api.replicate.records import PredictionRecords
from gateway.api.replicate.runner import BACKEND_FAILED, UNRECORDED, PredictionService
from gateway.api.replicate.webhooks import WebhookSecrets
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from tests.support.prediction_records import new_prediction


class RecordingTicket(FinishOnce):
    def __init__(self, fail: bool = False) -> None:
        self.headers: dict[str, str] = {}
        self.finished: list[tuple[UsageStatus, int, int]] = []
        self._fail = fail

    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        self.finished.append((status, generation.prompt_tokens, generation.completion_tokens))
        if self._fail:
            raise RuntimeError("the database is gone")


class CrashingAfterOneTokenBackend:
    capabilities = BackendCapabilities(max_concurrency=1, context_length=4096)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        yield TokenDelta("Hello", (15043,))
        raise GenerationFailed("the engine crashed")


Start = Callable[..., Awaitable[tuple[PredictionService, Prediction, RecordingTicket]]]


@pytest.fixture
def start(make_runtime: Callable[..., ModelRuntime], service: PredictionService) -> Start:
    async def begin(
        backend: object = None, *, max_tokens: int = 8, ticket: RecordingTicket | None = None
    ) -> tuple[PredictionService, Prediction, RecordingTicket]:
        runtime = make_runtime(backend)
        prediction = new_prediction()
        await service.create(prediction)
        ticket = ticket or RecordingTicket()
        generation = Generation(runtime, "req_test", [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens))
        service.start(prediction, generation, ticket)
        return service, prediction, ticket

    return begin


async def settled(prediction: Prediction) -> None:
    await asyncio.wait_for(prediction.wait_done(), 5)


async def test_a_run_records_usage_before_it_shows_succeeded(start: Start) -> None:
    _, prediction, ticket = await start(ScriptedBackend(reply="one two three"))
    assert not prediction.done
    await settled(prediction)
    assert prediction.status == "succeeded"
    assert prediction.output == ["one", " two", " three"]
    assert ticket.finished == [("completed", 4, 3)]
    assert (prediction.metrics["input_token_count"], prediction.metrics["output_token_count"]) == (4, 3)


async def test_running_out_of_tokens_is_billed_as_length(start: Start) -> None:
    _, prediction, ticket = await start(ScriptedBackend(end_with_eos=False), max_tokens=5)
    await settled(prediction)
    assert prediction.status == "succeeded"
    assert ticket.finished == [("length", 4, 5)]


async def test_cancel_stops_the_run_and_bills_what_it_produced(start: Start) -> None:
    service, prediction, ticket = await start(ScriptedBackend(token_delay_ms=5, end_with_eos=False), max_tokens=10_000)
    async with asyncio.timeout(5):
        while len(prediction.output) < 3:
            await prediction.changed()
    await service.cancel(prediction)
    assert prediction.status == "canceled"
    ((status, prompt, completion),) = ticket.finished
    assert (status, prompt) == ("cancelled", 4)
    assert completion == prediction.metrics["output_token_count"] >= 3
    assert service.running == 0


async def test_cancel_before_the_run_began_still_settles(start: Start) -> None:
    service, prediction, ticket = await start(ScriptedBackend())
    await service.cancel(prediction)  # the task has not taken a step yet
    assert prediction.status == "canceled"
    assert ticket.finished == [("cancelled", 4, 0)]


async def test_cancelling_a_finished_prediction_changes_nothing(start: Start) -> None:
    service, prediction, ticket = await start(ScriptedBackend(reply="done"))
    await settled(prediction)
    await service.cancel(prediction)
    assert prediction.status == "succeeded"
    assert len(ticket.finished) == 1


async def test_a_backend_failure_fails_the_prediction_and_is_billed(start: Start) -> None:
    _, prediction, ticket = await start(CrashingAfterOneTokenBackend())
    await settled(prediction)
    assert (prediction.status, prediction.error) == ("failed", BACKEND_FAILED)
    assert prediction.output == ["Hello"]
    assert ticket.finished == [("failed", 4, 1)]


async def test_usage_that_cannot_be_recorded_fails_the_prediction(start: Start) -> None:
    _, prediction, _ = await start(ScriptedBackend(reply="fine"), ticket=RecordingTicket(fail=True))
    await settled(prediction)
    assert (prediction.status, prediction.error) == ("failed", UNRECORDED)


async def test_closing_cancels_and_settles_every_run(start: Start) -> None:
    service, first, first_ticket = await start(ScriptedBackend(token_delay_ms=5, end_with_eos=False), max_tokens=10_000)
    await asyncio.sleep(0.02)
    await service.aclose()
    assert first.status == "canceled"
    assert first_ticket.finished[0][0] == "cancelled"
    assert service.running == 0


async def test_an_app_has_one_service_which_its_shutdown_closes(start: Start) -> None:
    from litestar import Litestar

    from gateway.api.replicate.runner import SERVICE_KEY, close_predictions, prediction_service

    app = Litestar(route_handlers=[])
    service, prediction, ticket = await start(ScriptedBackend(token_delay_ms=5, end_with_eos=False), max_tokens=100)
    app.state[SERVICE_KEY] = service
    assert prediction_service(app) is service
    await close_predictions(app)
    assert prediction.status == "canceled"
    assert ticket.finished[0][0] == "cancelled"
    await close_predictions(Litestar(route_handlers=[]))  # an app that never served a prediction


async def test_the_database_follows_the_run_and_holds_its_end(start: Start) -> None:
    service, prediction, ticket = await start(ScriptedBackend(token_delay_ms=20, end_with_eos=False), max_tokens=30)
    async with asyncio.timeout(10):
        while True:  # another replica sees the output grow while it runs
            stored = await service.records.get(prediction.id, "key-a")
            assert stored is not None
            if stored.status == "processing" and stored.output:
                break
            await asyncio.sleep(0.05)
    await settled(prediction)
    assert ticket.finished == [("length", 4, 30)]
    ended = await service.records.get(prediction.id, "key-a")
    assert ended is not None
    assert ended.to_json() == prediction.to_json()


async def test_a_cancel_asked_on_another_replica_stops_the_run(
    start: Start, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runner, prediction, ticket = await start(ScriptedBackend(token_delay_ms=5, end_with_eos=False), max_tokens=10_000)
    other = PredictionService(PredictionRecords(sessionmaker), WebhookSecrets(sessionmaker))
    async with asyncio.timeout(5):
        while len(prediction.output) < 3:
            await prediction.changed()
    seen = await other.get(prediction.id, "key-a")
    assert seen is not None
    assert seen is not prediction, "the other replica reads the database"
    canceled = await other.cancel(seen)
    assert (canceled.status, canceled.done) == ("canceled", True)
    assert prediction.status == "canceled"
    ((status, _, completion),) = ticket.finished
    assert status == "cancelled"
    assert canceled.metrics["output_token_count"] == completion >= 3
    assert runner.running == 0
