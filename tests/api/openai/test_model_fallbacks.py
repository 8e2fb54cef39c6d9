"""Per-model fallbacks through a live gateway and the OpenAI SDK.

The requested model forwards to remote workers that are all down; its fallback is a scripted
model with a reply, a system prompt and prices of its own. The client gets the fallback's reply
under the fallback's name, and the one usage row of each request names the model that served.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from gateway.db.column_types import MONEY_SCALE
from tests.support.gateways import create_key
from tests.support.live import free_port
from tests.support.model_configs import replace_struct, scripted_model, with_system_prompt
from tests.support.replica_workers import WORKER_KEY, WORKER_KEY_ENV, front_metric, front_model
from tests.support.served import Served, serve

PRIMARY = "primary-chat"
BACKUP = "backup-chat"
BACKUP_REPLY = "the backup answers"
MESSAGES: list[Any] = [{"role": "user", "content": "Who answers?"}]
PRIMARY_PRICES = (Decimal("5"), Decimal("7"))
BACKUP_PRICES = (Decimal("1"), Decimal("3"))


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    down = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]  # nothing listens: every worker is down
    primary = front_model(PRIMARY, down, fallbacks=[BACKUP], probe_interval_s=600)
    primary = replace_struct(primary, pricing=replace_struct(primary.pricing, input_per_million=PRIMARY_PRICES[0]))
    primary = replace_struct(primary, pricing=replace_struct(primary.pricing, output_per_million=PRIMARY_PRICES[1]))
    backup = scripted_model(
        BACKUP, max_concurrency=4, input_price=BACKUP_PRICES[0], output_price=BACKUP_PRICES[1], reply=BACKUP_REPLY
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORKER_KEY_ENV, WORKER_KEY)
        with serve(tmp_path_factory, [primary, with_system_prompt(backup, "Be brief.")]) as gateway:
            yield gateway


def _one_row(front: Served, request_id: str) -> dict[str, Any]:
    front.usage_row(request_id)
    rows = front.usage_rows("request_id = ?", request_id)
    assert len(rows) == 1, rows
    return rows[0]


def _assert_billed_as_backup(row: dict[str, Any], completion_tokens: int, status: str = "completed") -> None:
    assert (row["model"], row["status"], row["completion_tokens"]) == (BACKUP, status, completion_tokens)
    # SQLite holds money as an integer count of 1e-10 USD.
    prices = (row["input_price_per_million"], row["output_price_per_million"])
    assert tuple(Decimal(price).scaleb(-MONEY_SCALE) for price in prices) == BACKUP_PRICES


def test_a_whole_reply_comes_from_the_fallback_and_names_it(front: Served) -> None:
    fallbacks_before = front_metric(
        front.live.base_url, "llama_gateway_model_fallbacks_total", model=PRIMARY, served_model=BACKUP
    )
    response = front.client().chat.completions.with_raw_response.create(model=PRIMARY, messages=MESSAGES)
    reply = response.parse()
    assert reply.model == BACKUP
    assert response.headers["x-gateway-served-model"] == BACKUP
    assert reply.choices[0].message.content == BACKUP_REPLY
    assert reply.usage is not None
    # The fallback's own prompt (its system prompt included), as a direct request builds it.
    direct = front.client().chat.completions.create(model=BACKUP, messages=MESSAGES)
    assert direct.usage is not None
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens

    row = _one_row(front, response.headers["x-request-id"])
    _assert_billed_as_backup(row, len(BACKUP_REPLY.split()))
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    after = front_metric(front.live.base_url, "llama_gateway_model_fallbacks_total", model=PRIMARY, served_model=BACKUP)
    assert after == fallbacks_before + 1


def test_a_stream_from_the_fallback_names_it_in_every_chunk(front: Served) -> None:
    response = front.client().chat.completions.with_raw_response.create(
        model=PRIMARY, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(response.parse())
    assert {chunk.model for chunk in chunks} == {BACKUP}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == BACKUP_REPLY
    assert chunks[-1].usage is not None
    _assert_billed_as_backup(_one_row(front, response.headers["x-request-id"]), chunks[-1].usage.completion_tokens)


def test_a_legacy_completion_falls_back_too(front: Served) -> None:
    response = front.client().completions.with_raw_response.create(model=PRIMARY, prompt="Who answers?", max_tokens=3)
    reply = response.parse()
    assert reply.model == BACKUP
    assert reply.choices[0].text == "the backup answers"
    _assert_billed_as_backup(_one_row(front, response.headers["x-request-id"]), 3, "length")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_key_that_may_not_use_the_fallback_gets_the_failure(front: Served, stream: bool) -> None:
    _, key = create_key(front.live, name="primary only", allowed_models=[PRIMARY])
    client = front.client(api_key=key)
    if stream:
        response = client.chat.completions.with_raw_response.create(model=PRIMARY, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError, match="failed while generating"):
            list(response.parse())
        request_id = response.headers["x-request-id"]
    else:
        with pytest.raises(openai.InternalServerError) as failure:
            client.chat.completions.create(model=PRIMARY, messages=MESSAGES)
        request_id = failure.value.response.headers["x-request-id"]
    row = _one_row(front, request_id)
    assert (row["model"], row["status"], row["completion_tokens"]) == (PRIMARY, "failed", 0)
    backup_prompt = front.client().chat.completions.create(model=BACKUP, messages=MESSAGES).usage
    assert backup_prompt is not None
    assert row["prompt_tokens"] != backup_prompt.prompt_tokens  # the primary's own prompt, without a system prompt
