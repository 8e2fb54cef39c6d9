"""``AccountingMetering`` on its own: an ``AdmissionRequest`` in, a ticket (or a refusal) out, and a
usage row once the ticket is finished; on a real migrated database and without any web framework."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import msgspec
import pytest
from sqlalchemy import select

from backends.base import SamplingParams
from backends.scripted import ScriptedBackend
from gateway.accounting.billing import AccountingMetering
from gateway.accounting.keys import ApiKeyInfo, NewKey
from gateway.accounting.metering import AdmissionRequest, usage_status
from gateway.accounting.services import Accounting, open_accounting
from gateway.db.tables import UsageRecord
from gateway.errors import ApiError, model_not_found
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from gateway.serving.tokenizers import load_tokenizer
from gateway.settings import ModelConfig, Pricing, Settings
from tests.support.paths import LLAMA2_TOKENIZER_MODEL

MODEL = "metered"
PRICING = Pricing(input_per_million=Decimal("1000"), output_per_million=Decimal("10000"))
PROMPT_IDS = [1, 2, 3, 4]


@pytest.fixture
async def accounting(db_url_migrated: str) -> AsyncIterator[Accounting]:
    opened = await open_accounting(Settings(database_url=db_url_migrated))
    try:
        yield opened
    finally:
        await opened.aclose()


async def new_key(accounting: Accounting, **fields: object) -> ApiKeyInfo:
    info, _ = await accounting.keys.create(msgspec.convert({"name": "metered", **fields}, NewKey))
    return info


def admission_for(key: ApiKeyInfo, **changes: object) -> AdmissionRequest:
    fields: dict[str, object] = {
        "key": key,
        "model": MODEL,
        "pricing": PRICING,
        "prompt_tokens": len(PROMPT_IDS),
        "max_new_tokens": 16,
        "request_id": "req_metering_test",
        "endpoint": "/v1/chat/completions",
        "user": "end-user-7",
    }
    fields.update(changes)
    return AdmissionRequest(**fields)  # type: ignore[arg-type]


def runtime() -> ModelRuntime:
    config = ModelConfig(name=MODEL, backend="scripted", template="llama-2", tokenizer=str(LLAMA2_TOKENIZER_MODEL))
    return ModelRuntime(config, ScriptedBackend(reply="one two three"), load_tokenizer(config), None)


async def usage_rows(accounting: Accounting) -> list[UsageRecord]:
    async with accounting.sessionmaker() as session:
        return list((await session.scalars(select(UsageRecord))).all())


async def test_an_allowed_key_is_admitted_and_its_finished_ticket_writes_one_usage_row(
    accounting: Accounting,
) -> None:
    key = await new_key(accounting, allowed_models=[MODEL], budget_usd="1")
    admission = admission_for(key)
    ticket = await AccountingMetering(accounting).admit(admission)

    generation = Generation(runtime(), admission.request_id, PROMPT_IDS, SamplingParams(max_tokens=16))
    async for _ in generation.events():
        pass
    status = usage_status(generation)
    await ticket.finish(generation, status)
    await ticket.finish(generation, "failed")  # only the first finish counts

    [row] = await usage_rows(accounting)
    assert (row.request_id, row.key_id, row.model, row.endpoint, row.user) == (
        "req_metering_test",
        key.id,
        MODEL,
        "/v1/chat/completions",
        "end-user-7",
    )
    assert (row.prompt_tokens, row.completion_tokens, row.status) == (4, 3, "completed")
    assert (row.input_price_per_million, row.output_price_per_million) == (Decimal("1000"), Decimal("10000"))
    assert row.input_cost + row.output_cost == Decimal("0.034")


async def test_a_key_not_allowed_the_model_gets_model_not_found(accounting: Accounting) -> None:
    key = await new_key(accounting, allowed_models=["another-model"])
    with pytest.raises(ApiError) as caught:
        await AccountingMetering(accounting).admit(admission_for(key))
    expected = model_not_found(MODEL)
    assert (caught.value.status, caught.value.code, caught.value.param, caught.value.message) == (
        404,
        expected.code,
        expected.param,
        expected.message,
    )
    assert await usage_rows(accounting) == []


async def test_a_request_over_the_budget_is_refused_with_429(accounting: Accounting) -> None:
    key = await new_key(accounting, budget_usd="1")
    # Worst case: 4 prompt tokens at $0.001 and 1000 new tokens at $0.01 each, $10 in all.
    with pytest.raises(ApiError) as caught:
        await AccountingMetering(accounting).admit(admission_for(key, max_new_tokens=1000))
    assert (caught.value.status, caught.value.type, caught.value.code) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert await usage_rows(accounting) == []
