"""``ObservedTicket``: the routes' ticket observes the inner ticket's finish exactly once, however
many callers wait for it and whatever happens to them."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from backends.base import SamplingParams
from backends.scripted import ScriptedBackend
from gateway.accounting.metering import AdmissionRequest, FinishOnce
from gateway.accounting.usage import UsageStatus
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.request_observer import ObservedTicket
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from gateway.serving.tokenizers import load_tokenizer
from gateway.settings import ModelConfig, Pricing
from tests.support.accounting_records import key_info
from tests.support.paths import LLAMA2_TOKENIZER_MODEL

MODEL = "observed"
PROMPT_IDS = [1, 2, 3, 4]


class HeldTicket(FinishOnce):
    """Records its finishes; each waits until the test lets it end (or fail)."""

    def __init__(self) -> None:
        self.started: list[UsageStatus] = []
        self.release: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def headers(self) -> dict[str, str]:
        return {}

    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        self.started.append(status)
        await self.release


class ImmediateTicket(FinishOnce):
    """A finish with nothing to wait for, as a usage row committed at once."""

    def __init__(self) -> None:
        self.finishes = 0

    @property
    def headers(self) -> dict[str, str]:
        return {}

    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        self.finishes += 1


async def finished_generation() -> Generation:
    config = ModelConfig(name=MODEL, backend="scripted", template="llama-2", tokenizer=str(LLAMA2_TOKENIZER_MODEL))
    runtime = ModelRuntime(config, ScriptedBackend(reply="one two three"), load_tokenizer(config), None)
    generation = Generation(runtime, "req_observed", PROMPT_IDS, SamplingParams(max_tokens=16))
    async for _ in generation.events():
        pass
    return generation


def observed(inner: FinishOnce, metrics: GatewayMetrics, settled: list[bool]) -> ObservedTicket:
    key = key_info()
    pricing = Pricing(input_per_million=Decimal("1000"), output_per_million=Decimal("10000"))
    admission = AdmissionRequest(key, MODEL, pricing, len(PROMPT_IDS), 16, "req_observed", "/v1/completions", None)
    return ObservedTicket(inner, metrics, admission, log_content=False, on_settled=lambda: settled.append(True))


async def recording_started(inner: HeldTicket) -> None:
    for _ in range(100):
        if inner.started:
            return
        await asyncio.sleep(0)
    raise AssertionError("the inner ticket's finish never started")


def generations_counted(metrics: GatewayMetrics, status: str) -> float:
    value = metrics.registry.get_sample_value("llama_gateway_generations_total", {"model": MODEL, "status": status})
    return value or 0.0


async def test_callers_share_one_finish_and_see_its_outcome_when_they_resume() -> None:
    inner, metrics, settled = HeldTicket(), GatewayMetrics(), []
    ticket = observed(inner, metrics, settled)
    generation = await finished_generation()

    waiters = [asyncio.create_task(ticket.finish(generation, status)) for status in ("completed", "failed")]
    await recording_started(inner)
    await asyncio.sleep(0)
    assert inner.started == ["completed"]  # the first finish counts, once
    assert ticket.outcome is None
    assert settled == []

    inner.release.set_result(None)
    await asyncio.gather(*waiters)
    outcome = ticket.outcome
    assert outcome is not None
    assert (outcome.status, outcome.prompt_tokens, outcome.completion_tokens) == ("completed", 4, 3)
    assert outcome.usage_recorded
    assert outcome.cost_usd == Decimal("0.034")
    assert settled == [True]
    assert generations_counted(metrics, "completed") == 1
    assert await ticket.settled_outcome() is outcome


async def test_a_caller_cancelled_while_usage_is_recorded_does_not_cut_it_short() -> None:
    inner, metrics, settled = HeldTicket(), GatewayMetrics(), []
    ticket = observed(inner, metrics, settled)
    generation = await finished_generation()

    caller = asyncio.create_task(ticket.finish(generation, "cancelled"))
    await recording_started(inner)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ticket.outcome is None  # still recording

    inner.release.set_result(None)
    outcome = await ticket.settled_outcome()
    assert outcome is not None
    assert outcome.usage_recorded
    assert outcome.status == "cancelled"
    assert settled == [True]
    assert generations_counted(metrics, "cancelled") == 1


async def test_a_usage_row_that_could_not_be_recorded_is_observed_as_such() -> None:
    inner, metrics, settled = HeldTicket(), GatewayMetrics(), []
    ticket = observed(inner, metrics, settled)
    generation = await finished_generation()

    caller = asyncio.create_task(ticket.finish(generation, "completed"))
    await recording_started(inner)
    inner.release.set_exception(RuntimeError("the database is gone"))
    with pytest.raises(RuntimeError, match="the database is gone"):
        await caller
    outcome = ticket.outcome
    assert outcome is not None
    assert not outcome.usage_recorded
    assert outcome.log_fields()["usage_recorded"] is False
    assert settled == [True]


async def test_a_finish_with_nothing_to_wait_for_is_done_and_observed_when_finishing_returns() -> None:
    inner, metrics, settled = ImmediateTicket(), GatewayMetrics(), []
    ticket = observed(inner, metrics, settled)
    generation = await finished_generation()

    finishing = ticket.finishing(generation, "completed")
    # Started in the caller's turn of the loop: no task switch before the outcome is known.
    assert finishing.done()
    outcome = ticket.outcome
    assert outcome is not None
    assert outcome.usage_recorded
    assert settled == [True]

    await ticket.finish(generation, "failed")  # a later call changes nothing
    assert inner.finishes == 1
    assert ticket.outcome is outcome
    assert (generations_counted(metrics, "completed"), generations_counted(metrics, "failed")) == (1, 0)
