"""The usage dashboard in a real Chromium against a live gateway with real usage: what it draws and
lists is what the API answers, keys are managed through it, its CSV is the command line's, and a
user key sees nothing but its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Request, expect

from tests.support.dashboard_page import (
    latency_cells,
    show,
    sign_in,
    table,
    usage_cells,
    usd,
    wait_until_loaded,
)
from tests.support.gateways import admin_client, bearer, create_key, gateway, scripted_model
from tests.support.live import LiveGateway
from tests.support.usage_data import chat, cli_usage_csv, entry, in_own_loop, insert_usage, migrated_sqlite

BIG, SMALL = "llama-2-70b-chat", "llama-2-7b-chat"
MODELS = [
    scripted_model(BIG, price_in="0.65", price_out="2.75"),
    scripted_model(SMALL, price_in="0.05", price_out="0.25"),
]
HOSTILE_NAME = '<img src=x onerror="window.__injected = 1">'


@dataclass(frozen=True)
class Board:
    live: LiveGateway
    url: str
    alpha_id: str
    alpha: str
    beta_id: str
    hostile_id: str
    since: str
    until: str

    @property
    def window(self) -> dict[str, str]:
        return {"since": self.since, "until": self.until}

    def admin(self) -> httpx.Client:
        return admin_client(self.live)

    def api(self, path: str, key: str | None = None, **params: str) -> Any:
        headers = bearer(key or self.live.admin_key)
        response = httpx.get(f"{self.live.base_url}{path}", params=params, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    """Three keys with requests served now and rows from earlier days, of every outcome."""
    url = migrated_sqlite(tmp_path_factory.mktemp("dashboard-browser"))
    with gateway(url, MODELS) as live:
        alpha_id, alpha = create_key(live, name="alpha", budget_usd="5", budget_period="monthly")
        beta_id, beta = create_key(live, name="beta", budget_usd="0.5", budget_period="daily", rpm=100)
        hostile_id, hostile = create_key(live, name=HOSTILE_NAME)
        for key, model in [(alpha, BIG), (alpha, BIG), (alpha, SMALL), (beta, SMALL), (hostile, BIG)]:
            chat(live, key, model)
        now = datetime.now(UTC)
        past = [
            entry("past-1", alpha_id, BIG, now - timedelta(days=2), status="failed", ttft_ms=None),
            entry("past-2", alpha_id, BIG, now - timedelta(days=2, hours=3), status="length", ttft_ms=90),
            entry("past-3", beta_id, SMALL, now - timedelta(days=3), status="cancelled", prices=("0.05", "0.25")),
        ]
        in_own_loop(lambda: insert_usage(url, past))
        today = now.date()
        since, until = (today - timedelta(days=6)).isoformat(), (today + timedelta(days=1)).isoformat()
        yield Board(live, url, alpha_id, alpha, beta_id, hostile_id, since, until)


@pytest.fixture
def requests_seen(page: Page) -> list[Request]:
    seen: list[Request] = []

    def record(request: Request) -> None:
        seen.append(request)

    page.on("request", record)
    return seen


def test_an_admin_sees_what_the_api_answers(page: Page, board: Board) -> None:
    sign_in(page, board.live.base_url, board.live.admin_key)
    expect(page.locator("#whoami")).to_contain_text("admin")
    show(page, since=board.since, until=board.until, bucket="day", by="model")

    by_model = board.api("/admin/usage", group_by="model", **board.window)
    assert by_model["total"]["requests"] == 8
    assert page.text_content("#total-requests") == f"{by_model['total']['requests']:,}"
    assert page.text_content("#total-tokens") == f"{by_model['total']['total_tokens']:,}"
    assert page.text_content("#total-spend") == usd(by_model["total"]["total_cost_usd"])
    expected_rows = [[row["group"], row["group"], *usage_cells(row)] for row in by_model["data"]]
    assert table(page, "#series-table") == [*expected_rows, ["total", "total", *usage_cells(by_model["total"])]]

    # Both charts are drawn, one series per model, named in their legends.
    for chart in ("#spend-chart", "#tokens-chart", "#status-chart"):
        expect(page.locator(f"{chart} canvas")).to_have_count(1)
    legend = page.locator("#spend-chart .u-legend .u-series .u-label").all_text_contents()
    assert legend == ["day (UTC)", *(row["group"] for row in by_model["data"])]

    by_status = board.api("/admin/usage", group_by="status", **board.window)
    assert {row["group"] for row in by_status["data"]} == {"completed", "failed", "length", "cancelled"}
    assert table(page, "#status-table") == [
        [row["group"], row["group"], *usage_cells(row)] for row in by_status["data"]
    ]
    status_legend = page.locator("#status-chart .u-legend .u-series .u-label").all_text_contents()
    assert set(status_legend[1:]) == {"completed", "failed", "length", "cancelled"}

    latency = board.api("/admin/usage/latency", group_by="model", **board.window)
    expected_latency = [[row["group"], row["group"], *latency_cells(row)] for row in latency["data"]]
    assert table(page, "#latency-table") == [*expected_latency, ["total", "all", *latency_cells(latency["total"])]]

    by_key = board.api("/admin/usage", group_by="key", **board.window)
    ranked = sorted(by_key["data"], key=lambda row: (-Decimal(row["total_cost_usd"]), -row["requests"]))
    assert table(page, "#top-keys") == [[row["group"], row["label"], row["group"], *usage_cells(row)] for row in ranked]

    budgets = board.api("/admin/usage/budgets")["data"]
    shown = table(page, "#budgets-table")
    assert [row[:6] for row in shown] == [
        [
            status["key"]["id"],
            status["key"]["name"],
            status["key"]["budget_period"],
            usd(status["key"]["budget_usd"]),
            usd(status["spent_usd"]),
            usd(status["remaining_usd"]),
        ]
        for status in budgets
    ]
    expect(page.locator(f'#budgets-table tr[data-key="{board.alpha_id}"] meter')).to_have_count(1)

    show(page, since=board.since, until=board.until, bucket="hour", by="key")
    by_key_rows = [[row["group"], row["label"], *usage_cells(row)] for row in by_key["data"]]
    assert table(page, "#series-table")[:-1] == by_key_rows
    legend = page.locator("#tokens-chart .u-legend .u-series .u-label").all_text_contents()
    assert legend == ["hour (UTC)", *(row["label"] for row in by_key["data"])]


def test_keys_are_created_once_changed_and_revoked(page: Page, board: Board) -> None:
    sign_in(page, board.live.base_url, board.live.admin_key)
    page.fill("#new-name", "made in the browser")
    page.fill("#new-budget", "2.5")
    page.select_option("#new-period", "monthly")
    page.fill("#new-rpm", "7")
    page.click("#create-key")
    expect(page.locator("#new-key")).to_be_visible()
    plaintext = page.text_content("#new-key-value") or ""
    assert plaintext.startswith("sk-")
    page.click("#copy-key")
    expect(page.locator("#copy-result")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == plaintext

    # The key works at once, with the limits given, and nothing shows it again once dismissed.
    own = board.api("/v1/usage/budget", key=plaintext)["key"]
    assert (own["name"], own["budget_usd"], own["budget_period"], own["rpm"]) == (
        "made in the browser",
        "2.50",
        "monthly",
        7,
    )
    page.click("#dismiss-key")
    wait_until_loaded(page)
    assert plaintext not in page.content()
    row = page.locator(f'#keys-table tr[data-key="{own["id"]}"]')
    expect(row).to_contain_text("made in the browser")
    expect(row).to_contain_text("$2.50 monthly")

    row.locator("button.edit").click()
    expect(page.locator("#edit-key-dialog")).to_be_visible()
    page.fill("#edit-rpm", "9")
    page.fill("#edit-budget", "")
    page.fill("#edit-expires", "2099-01-31")
    page.click("#save-key")
    expect(page.locator("#edit-key-dialog")).to_be_hidden()
    expect(row).to_contain_text("2099-01-31 00:00 UTC")
    changed = board.api(f"/admin/keys/{own['id']}")
    assert (changed["rpm"], changed["budget_usd"], changed["expires_at"]) == (9, None, "2099-01-31T00:00:00+00:00")

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.revoke").click()
    expect(row).to_have_attribute("data-status", "revoked")
    assert board.api(f"/admin/keys/{own['id']}")["status"] == "revoked"
    refused = httpx.get(f"{board.live.base_url}/v1/usage", headers=bearer(plaintext), timeout=60)
    assert refused.status_code == 401


@pytest.mark.parametrize(("bucket", "by"), [("day", "model"), ("hour", "key")])
def test_the_csv_export_is_the_command_lines_csv(page: Page, board: Board, bucket: str, by: str) -> None:
    sign_in(page, board.live.base_url, board.live.admin_key)
    show(page, since=board.since, until=board.until, bucket=bucket, by=by)
    with page.expect_download() as download:
        page.click("#export-csv")
    exported = download.value
    assert exported.suggested_filename == f"usage-by-{by}-{bucket}.csv"
    expected = cli_usage_csv(
        board.url, "--group-by", by, "--bucket", bucket, "--since", board.since, "--until", board.until
    )
    assert exported.path().read_bytes() == expected


def test_a_user_key_sees_only_its_own(page: Page, board: Board, requests_seen: list[Request]) -> None:
    sign_in(page, board.live.base_url, board.alpha)
    expect(page.locator("#whoami")).to_contain_text("alpha")
    expect(page.locator("#keys-section")).to_be_hidden()
    expect(page.locator("#top-keys-section")).to_be_hidden()
    show(page, since=board.since, until=board.until, bucket="day", by="model")

    own = board.api("/v1/usage", key=board.alpha, group_by="model", **board.window)
    assert own["total"]["requests"] == 5
    assert page.text_content("#total-requests") == "5"
    assert page.text_content("#total-spend") == usd(own["total"]["total_cost_usd"])
    assert table(page, "#series-table")[:-1] == [[row["group"], row["group"], *usage_cells(row)] for row in own["data"]]
    budget = board.api("/v1/usage/budget", key=board.alpha)
    assert [row[:6] for row in table(page, "#budgets-table")] == [
        [board.alpha_id, "alpha", "monthly", "$5.00", usd(budget["spent_usd"]), usd(budget["remaining_usd"])]
    ]
    text = page.inner_text("body")
    assert "beta" not in text
    assert "initial admin" not in text

    with page.expect_download() as download:
        page.click("#export-csv")
    expected = cli_usage_csv(
        board.url, "--key", board.alpha_id, "--group-by", "model", "--bucket", "day", *window_options(board)
    )
    assert download.value.path().read_bytes() == expected

    api_calls = [r.url for r in requests_seen if "/dashboard/" not in r.url]
    assert api_calls
    assert all(url.startswith(f"{board.live.base_url}/v1/usage") for url in api_calls), api_calls

    # Reaching further by hand gets nothing either.
    with httpx.Client(base_url=board.live.base_url, headers=bearer(board.alpha), timeout=60) as alpha:
        for path in ("/admin/usage", "/admin/keys", "/admin/usage/budgets", "/admin/usage/latency"):
            assert alpha.get(path).status_code == 403, path
        assert alpha.get("/v1/usage", params={"key": board.beta_id}).status_code == 403


def window_options(board: Board) -> list[str]:
    return ["--since", board.since, "--until", board.until]


def test_names_are_shown_as_text_never_run_as_markup(page: Page, board: Board) -> None:
    sign_in(page, board.live.base_url, board.live.admin_key)
    show(page, since=board.since, until=board.until, by="key")
    for selector in ("#top-keys", "#keys-table", "#budgets-table", "#series-table"):
        cell = page.locator(
            f'{selector} tr[data-key="{board.hostile_id}"], {selector} tr[data-group="{board.hostile_id}"]'
        )
        expect(cell.first).to_contain_text(HOSTILE_NAME)
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.__injected") is None
    legend = page.locator("#spend-chart .u-legend .u-series .u-label").all_text_contents()
    assert HOSTILE_NAME in legend


def test_the_key_stays_in_the_tab_and_out_of_every_url(page: Page, board: Board, requests_seen: list[Request]) -> None:
    page.goto(f"{board.live.base_url}/dashboard/")
    page.fill("#api-key", "sk-not-a-key-of-this-gateway")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in-error")).to_have_text("That key is not valid.")
    expect(page.locator("#board")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, board.live.base_url, board.live.admin_key)
    assert page.evaluate("Object.values(sessionStorage)") == [board.live.admin_key]
    page.reload()  # the same tab keeps it
    wait_until_loaded(page)
    expect(page.locator("#board")).to_be_visible()
    api_calls = [r for r in requests_seen if "/dashboard/" not in r.url]
    assert api_calls
    for call in api_calls:
        assert board.live.admin_key not in call.url
        assert call.headers["authorization"] in (
            f"Bearer {board.live.admin_key}",
            "Bearer sk-not-a-key-of-this-gateway",
        )
    assert board.live.admin_key not in page.url

    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    other_tab = page.context.new_page()  # sessionStorage belongs to one tab
    other_tab.goto(f"{board.live.base_url}/dashboard/")
    expect(other_tab.locator("#sign-in")).to_be_visible()
    other_tab.close()


def test_the_preset_ranges_ask_for_whole_utc_buckets(page: Page, board: Board, requests_seen: list[Request]) -> None:
    sign_in(page, board.live.base_url, board.live.admin_key)
    first = next(r for r in requests_seen if "group_by=model&bucket=day" in r.url)
    since = httpx.URL(first.url).params["since"]
    assert since.endswith("T00:00:00.000Z")
    assert date.fromisoformat(since[:10]) == datetime.now(UTC).date() - timedelta(days=6)
    usage = board.api("/admin/usage", group_by="model", since=since)
    assert page.text_content("#total-requests") == f"{usage['total']['requests']:,}"
