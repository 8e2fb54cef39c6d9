"""``GET /v1/usage``: a key's own usage, exact to the token and the ten-place cent, never another's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.gateways import bearer, create_key, exact_cost, gateway, scripted_model, shared_database
from tests.support.live import LiveGateway

if TYPE_CHECKING:
    from conftest import PostgresServer

PRICES = {"llama-2-70b-chat": (Decimal("0.65"), Decimal("2.75")), "llama-2-7b-chat": (Decimal("0.05"), Decimal("0.25"))}
MODELS = [scripted_model(name, price_in=str(i), price_out=str(o)) for name, (i, o) in PRICES.items()]


@pytest.fixture(scope="module")
async def live(
    database_server: PostgresServer | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveGateway]:
    """One gateway per database for the module; each test makes keys of its own."""
    async with shared_database(database_server, tmp_path_factory.mktemp("usage-route")) as url:
        with gateway(url, MODELS) as served:
            yield served


def chat(live: LiveGateway, key: str, model: str, *, stream: bool = False) -> dict[str, int]:
    """One completion; the usage the client was told."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "How much is this?"}]}
    if not stream:
        response = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, headers=bearer(key))
        assert response.status_code == 200, response.text
        told: dict[str, int] = response.json()["usage"]
        return told
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, headers=bearer(key))
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: {")]
    usage: dict[str, int] = json.loads(events[-1])["usage"]
    return usage


def own_usage(live: LiveGateway, api_key: str, **params: str) -> httpx.Response:
    return httpx.get(f"{live.base_url}/v1/usage", params=params, headers=bearer(api_key))


def cost_of(model: str, told: dict[str, int]) -> Decimal:
    price_in, price_out = PRICES[model]
    return exact_cost(told["prompt_tokens"], price_in) + exact_cost(told["completion_tokens"], price_out)


def test_a_key_sees_exactly_its_own_usage(live: LiveGateway) -> None:
    mine_id, mine = create_key(live, name="mine")
    _, theirs = create_key(live, name="theirs")
    calls = [("llama-2-70b-chat", False), ("llama-2-70b-chat", True), ("llama-2-7b-chat", True)]
    told = [(model, chat(live, mine, model, stream=stream)) for model, stream in calls]
    chat(live, theirs, "llama-2-70b-chat")

    response = own_usage(live, mine)
    assert response.status_code == 200
    report = response.json()
    assert report["group_by"] == "day"
    assert report["filters"]["key"] == mine_id
    assert [(row["group"], row["requests"]) for row in report["data"]] == [(datetime.now(UTC).date().isoformat(), 3)]
    total = report["total"]
    assert total["prompt_tokens"] == sum(usage["prompt_tokens"] for _, usage in told)
    assert total["completion_tokens"] == sum(usage["completion_tokens"] for _, usage in told)
    assert Decimal(total["total_cost_usd"]) == sum((cost_of(model, usage) for model, usage in told), Decimal(0))

    by_model = own_usage(live, mine, group_by="model").json()
    for row in by_model["data"]:
        expected = sum((cost_of(model, usage) for model, usage in told if model == row["group"]), Decimal(0))
        assert Decimal(row["total_cost_usd"]) == expected
    assert [row["requests"] for row in by_model["data"]] == [2, 1]

    by_key = own_usage(live, mine, group_by="key").json()
    assert [(row["group"], row["label"]) for row in by_key["data"]] == [(mine_id, "mine")]


def test_filters_narrow_the_report(live: LiveGateway) -> None:
    _, key = create_key(live, name="filtered")
    chat(live, key, "llama-2-70b-chat")
    chat(live, key, "llama-2-7b-chat")
    assert own_usage(live, key, model="llama-2-7b-chat").json()["total"]["requests"] == 1
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert own_usage(live, key, since=tomorrow).json()["total"]["requests"] == 0
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert own_usage(live, key, since=hour_ago, until=tomorrow).json()["total"]["requests"] == 2
    assert own_usage(live, key, until="2001-09-09T01:46:40Z").json()["data"] == []


def test_a_key_without_requests_has_an_empty_report(live: LiveGateway) -> None:
    _, key = create_key(live, name="idle")
    report = own_usage(live, key).json()
    assert report["data"] == []
    assert report["total"]["requests"] == 0
    assert report["total"]["total_cost_usd"] == "0.0000000000"
    # An admin key on this route sees its own usage too, not everyone's.
    assert own_usage(live, live.admin_key).json()["filters"]["key"] != report["filters"]["key"]


def test_another_keys_usage_is_403(live: LiveGateway) -> None:
    mine_id, mine = create_key(live, name="curious")
    other_id, _ = create_key(live, name="private")
    assert own_usage(live, mine, key=mine_id).status_code == 200
    response = own_usage(live, mine, key=other_id)
    assert response.status_code == 403
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("permission_error", "key", "forbidden")


def test_without_a_valid_key_it_is_401(live: LiveGateway) -> None:
    response = httpx.get(f"{live.base_url}/v1/usage")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    key_id, key = create_key(live, name="revoked soon")
    httpx.post(f"{live.base_url}/admin/keys/{key_id}/revoke", headers=bearer(live.admin_key)).raise_for_status()
    assert own_usage(live, key).status_code == 401


@pytest.mark.parametrize(
    ("params", "param"), [({"group_by": "week"}, "group_by"), ({"since": "soon"}, "since"), ({"until": "x"}, "until")]
)
def test_invalid_filters_are_400(live: LiveGateway, params: dict[str, str], param: str) -> None:
    _, key = create_key(live, name="typo")
    response = own_usage(live, key, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
