"""The admin API: keys created, listed, shown, changed and revoked over HTTP, and everyone's usage.

Admin-scope keys only (403 for others, 401 without a key); errors in OpenAI's envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.gateways import (
    admin_client,
    bearer,
    create_key,
    exact_cost,
    gateway,
    scripted_model,
    shared_database,
)
from tests.support.live import LiveGateway

if TYPE_CHECKING:
    from conftest import PostgresServer

PRICE_IN, PRICE_OUT = Decimal("0.65"), Decimal("2.75")
MODELS = [
    scripted_model("llama-2-70b-chat", price_in=str(PRICE_IN), price_out=str(PRICE_OUT)),
    scripted_model("cheap", reply="Yes."),
]
ADMIN_ROUTES = [
    ("POST", "/admin/keys", {"name": "x"}),
    ("GET", "/admin/keys", None),
    ("GET", "/admin/keys/some-id", None),
    ("PATCH", "/admin/keys/some-id", {"rpm": 1}),
    ("POST", "/admin/keys/some-id/revoke", None),
    ("DELETE", "/admin/keys/some-id", None),
    ("GET", "/admin/usage", None),
]


@pytest.fixture(scope="module")
async def live(
    database_server: PostgresServer | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LiveGateway]:
    """One gateway per database for the module; each test makes keys of its own."""
    async with shared_database(database_server, tmp_path_factory.mktemp("admin-api")) as url:
        with gateway(url, MODELS) as served:
            yield served


@pytest.fixture
def admin(live: LiveGateway) -> Iterator[httpx.Client]:
    with admin_client(live) as client:
        yield client


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chat(live: LiveGateway, key: str, model: str = "llama-2-70b-chat") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}]}
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json=body, headers=bearer(key), timeout=30)
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


def test_a_created_key_is_shown_once_and_works(live: LiveGateway, admin: httpx.Client) -> None:
    fields = {
        "name": "team a",
        "owner": "alice@example.com",
        "metadata": {"cost_center": "42"},
        "allowed_models": ["cheap"],
        "rpm": 60,
        "tpm": 10000,
        "max_concurrency": 4,
        "budget_usd": "12.50",
        "budget_period": "monthly",
        "expires_at": "2100-01-01T00:00:00Z",
    }
    response = admin.post("/admin/keys", json=fields)
    assert response.status_code == 201
    created = response.json()
    plaintext = created.pop("key")
    assert plaintext.startswith("sk-")
    assert len(plaintext) >= 40
    assert created["object"] == "api_key"
    assert created["status"] == "active"
    assert created["scope"] == "user"
    assert created["budget_usd"] == "12.50"
    assert created["expires_at"] == "2100-01-01T00:00:00+00:00"
    assert created["revoked_at"] is None
    for name in ("owner", "metadata", "allowed_models", "rpm", "tpm", "max_concurrency", "budget_period"):
        assert created[name] == fields[name]
    assert plaintext.startswith(created["prefix"].split("…")[0])
    assert plaintext.endswith(created["prefix"].split("…")[1])

    # Shown once: never again, not even in part beyond the display prefix.
    shown = admin.get(f"/admin/keys/{created['id']}").json()
    assert shown == created
    listed = admin.get("/admin/keys")
    assert listed.json()["object"] == "list"
    assert created in listed.json()["data"]
    assert listed.json()["data"][0]["name"] == "initial admin"  # oldest first
    assert plaintext not in listed.text

    models = httpx.get(f"{live.base_url}/v1/models", headers=bearer(plaintext))
    assert [m["id"] for m in models.json()["data"]] == ["cheap"]


def test_an_admin_key_made_over_http_may_use_the_admin_api(live: LiveGateway, admin: httpx.Client) -> None:
    _, key = create_key(live, name="second admin", scope="admin")
    assert admin.get("/admin/keys", headers=bearer(key)).status_code == 200


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({}, "name", None),
        ({"name": ""}, "name", "invalid_value"),
        ({"name": "x", "rpm": 0}, "rpm", "invalid_value"),
        ({"name": "x", "scope": "root"}, "scope", "invalid_value"),
        ({"name": "x", "budget_period": "weekly"}, "budget_period", "invalid_value"),
        ({"name": "x", "budget_usd": "-1"}, "budget_usd", "invalid_value"),
        ({"name": "x", "budget_usd": "0.00000000001"}, "budget_usd", "invalid_value"),
        ({"name": "x", "expires_at": "2100-01-01T00:00:00"}, "expires_at", "invalid_value"),
        ({"name": "x", "allowed_models": "cheap"}, "allowed_models", "invalid_value"),
        ({"name": "x", "key": "sk-mine"}, "key", "unknown_parameter"),
    ],
)
def test_invalid_fields_are_400(admin: httpx.Client, fields: dict[str, Any], param: str, code: str | None) -> None:
    error = error_of(admin.post("/admin/keys", json=fields), 400)
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


def test_a_body_that_is_not_json_is_400(admin: httpx.Client) -> None:
    error_of(admin.post("/admin/keys", content=b"{name: x"), 400)
    error_of(admin.post("/admin/keys", content=b""), 400)
    error_of(admin.patch("/admin/keys/any", content=b"[]"), 400)


def test_update_changes_only_the_fields_given(live: LiveGateway, admin: httpx.Client) -> None:
    key_id, _ = create_key(live, name="before", owner="bob", rpm=10, budget_usd="5")
    response = admin.patch(f"/admin/keys/{key_id}", json={"name": "after", "owner": None, "tpm": 500})
    assert response.status_code == 200
    updated = response.json()
    assert (updated["name"], updated["owner"], updated["rpm"], updated["tpm"]) == ("after", None, 10, 500)
    assert updated["budget_usd"] == "5.00"
    assert admin.get(f"/admin/keys/{key_id}").json() == updated

    error = error_of(admin.patch(f"/admin/keys/{key_id}", json={"rpm": -5}), 400)
    assert error["param"] == "rpm"
    error = error_of(admin.patch(f"/admin/keys/{key_id}", json={"budget": "5"}), 400)
    assert (error["param"], error["code"]) == ("budget", "unknown_parameter")
    assert admin.get(f"/admin/keys/{key_id}").json() == updated


def test_an_unknown_key_id_is_404(admin: httpx.Client) -> None:
    for response in (
        admin.get("/admin/keys/no-such-key"),
        admin.patch("/admin/keys/no-such-key", json={"rpm": 5}),
        admin.post("/admin/keys/no-such-key/revoke"),
        admin.delete("/admin/keys/no-such-key"),
    ):
        error = error_of(response, 404)
        assert (error["param"], error["code"]) == ("key_id", "key_not_found")
        assert "no-such-key" in error["message"]


@pytest.mark.parametrize(("method", "suffix"), [("POST", "/revoke"), ("DELETE", "")])
def test_a_revoked_key_stops_at_once_and_stays_listed_on_request(
    live: LiveGateway, admin: httpx.Client, method: str, suffix: str
) -> None:
    key_id, key = create_key(live, name="leaving")
    chat(live, key)
    response = admin.request(method, f"/admin/keys/{key_id}{suffix}")
    assert response.status_code == 200
    revoked = response.json()
    assert revoked["status"] == "revoked"
    assert revoked["revoked_at"] is not None

    refused = httpx.get(f"{live.base_url}/v1/models", headers=bearer(key))
    assert error_of(refused, 401)["code"] == "invalid_api_key"
    # Revoking again keeps the first time.
    assert admin.post(f"/admin/keys/{key_id}/revoke").json()["revoked_at"] == revoked["revoked_at"]
    assert key_id not in [k["id"] for k in admin.get("/admin/keys").json()["data"]]
    for flag in ("true", "1"):
        listed = admin.get("/admin/keys", params={"include_revoked": flag}).json()["data"]
        assert revoked in listed
    # Its usage keeps its owner.
    assert admin.get("/admin/usage", params={"key": key_id}).json()["total"]["requests"] == 1
    error = error_of(admin.get("/admin/keys", params={"include_revoked": "maybe"}), 400)
    assert error["param"] == "include_revoked"


def test_an_expired_key_is_refused(live: LiveGateway, admin: httpx.Client) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    key_id, key = create_key(live, name="expired", expires_at=past)
    assert admin.get(f"/admin/keys/{key_id}").json()["status"] == "expired"
    assert error_of(httpx.get(f"{live.base_url}/v1/models", headers=bearer(key)), 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_need_an_admin_key(live: LiveGateway, method: str, path: str, body: dict[str, Any] | None) -> None:
    _, user_key = create_key(live, name="just a user")
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        error = error_of(client.request(method, path, json=body), 401)
        assert error["code"] == "invalid_api_key"
        error = error_of(client.request(method, path, json=body, headers=bearer("sk-not-a-real-key-at-all")), 401)
        assert error["code"] == "invalid_api_key"
        error = error_of(client.request(method, path, json=body, headers=bearer(user_key)), 403)
        assert (error["type"], error["code"]) == ("permission_error", "forbidden")


def test_usage_report_filters_groups_and_exact_totals(live: LiveGateway, admin: httpx.Client) -> None:
    alice_id, alice = create_key(live, name="alice")
    bob_id, bob = create_key(live, name="bob")
    told_alice = [chat(live, alice), chat(live, alice), chat(live, alice, "cheap")]
    told_bob = chat(live, bob)

    by_key = admin.get("/admin/usage").json()
    assert by_key["object"] == "usage_report"
    assert by_key["group_by"] == "key"
    rows = {row["group"]: row for row in by_key["data"]}
    assert (rows[alice_id]["label"], rows[alice_id]["requests"]) == ("alice", 3)
    assert (rows[bob_id]["label"], rows[bob_id]["requests"], rows[bob_id]["prompt_tokens"]) == (
        "bob",
        1,
        told_bob["prompt_tokens"],
    )
    alice_row = rows[alice_id]
    priced = told_alice[:2]  # the third went to the free model
    expected_in = sum((exact_cost(u["prompt_tokens"], PRICE_IN) for u in priced), Decimal(0))
    expected_out = sum((exact_cost(u["completion_tokens"], PRICE_OUT) for u in priced), Decimal(0))
    assert alice_row["prompt_tokens"] == sum(u["prompt_tokens"] for u in told_alice)
    assert alice_row["completion_tokens"] == sum(u["completion_tokens"] for u in told_alice)
    assert alice_row["total_tokens"] == alice_row["prompt_tokens"] + alice_row["completion_tokens"]
    assert Decimal(alice_row["input_cost_usd"]) == expected_in
    assert Decimal(alice_row["output_cost_usd"]) == expected_out
    assert Decimal(alice_row["total_cost_usd"]) == expected_in + expected_out
    # Amounts are plain decimal strings with ten places, never exponents.
    for amount in (alice_row["input_cost_usd"], alice_row["output_cost_usd"], alice_row["total_cost_usd"]):
        assert "E" not in amount
        assert len(amount.split(".")[1]) == 10
    # The total is the sum of its rows, exactly.
    total = by_key["total"]
    assert total["requests"] == sum(row["requests"] for row in by_key["data"])
    assert Decimal(total["total_cost_usd"]) == sum((Decimal(r["total_cost_usd"]) for r in by_key["data"]), Decimal(0))

    by_model = admin.get("/admin/usage", params={"group_by": "model", "key": alice_id}).json()
    assert {r["group"]: r["requests"] for r in by_model["data"]} == {"cheap": 1, "llama-2-70b-chat": 2}
    assert Decimal({r["group"]: r for r in by_model["data"]}["cheap"]["total_cost_usd"]) == 0
    assert by_model["total"]["label"] is None

    today = datetime.now(UTC).date().isoformat()
    by_day = admin.get("/admin/usage", params={"group_by": "day", "key": alice_id}).json()
    assert [(r["group"], r["requests"]) for r in by_day["data"]] == [(today, 3)]

    only = admin.get("/admin/usage", params={"key": alice_id, "model": "llama-2-70b-chat"}).json()
    assert only["total"]["requests"] == 2
    assert only["filters"] == {"key": alice_id, "model": "llama-2-70b-chat", "since": None, "until": None}
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert admin.get("/admin/usage", params={"key": alice_id, "since": tomorrow}).json()["total"]["requests"] == 0
    assert admin.get("/admin/usage", params={"key": alice_id, "until": "2000-01-01"}).json()["data"] == []
    window = {"key": alice_id, "since": str(int(datetime.now(UTC).timestamp()) - 3600), "until": tomorrow}
    assert admin.get("/admin/usage", params=window).json()["total"]["requests"] == 3


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01"}, "until"),
        ({"since": "2025-02-01", "until": "2025-01-01"}, "since"),
    ],
)
def test_invalid_report_filters_are_400(admin: httpx.Client, params: dict[str, str], param: str) -> None:
    error = error_of(admin.get("/admin/usage", params=params), 400)
    assert (error["param"], error["code"]) == (param, "invalid_value")
