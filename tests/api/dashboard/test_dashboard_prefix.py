"""The dashboard behind a reverse proxy that serves the gateway under a path prefix: the page, its
scripts and every API call stay under the prefix, because the page uses relative URLs only."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.support.dashboard_page import table, usage_cells, usd, wait_until_loaded
from tests.support.gateways import bearer, create_key, gateway, scripted_model
from tests.support.live import LiveGateway
from tests.support.prefix_proxy import prefix_proxy
from tests.support.usage_data import chat, migrated_sqlite

PREFIX = "/teams/llm"
MODEL = "llama-2-7b-chat"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    url = migrated_sqlite(tmp_path_factory.mktemp("dashboard-prefix"))
    with gateway(url, [scripted_model(MODEL, price_in="0.05", price_out="0.25")]) as served:
        _, key = create_key(served, name="behind a proxy")
        for _ in range(3):
            chat(served, key, MODEL)
        yield served


@pytest.fixture
def proxied(live: LiveGateway) -> Iterator[tuple[str, list[str]]]:
    with prefix_proxy(live.base_url, PREFIX) as (base, seen):
        yield base, seen


def test_the_dashboard_works_under_a_path_prefix(page: Page, live: LiveGateway, proxied: tuple[str, list[str]]) -> None:
    base, seen = proxied
    gateway_url = base + PREFIX
    assert httpx.get(f"{base}/dashboard/", timeout=30).status_code == 404  # the proxy serves the prefix only

    page.goto(f"{gateway_url}/dashboard")  # no slash: redirected within the prefix
    assert page.url == f"{gateway_url}/dashboard/"
    page.fill("#api-key", live.admin_key)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#board")).to_be_visible()
    wait_until_loaded(page)
    expect(page.locator("#status-line")).to_contain_text("Updated")

    since = httpx.URL(next(f"{base}{path}" for path in seen if "group_by=model&bucket=day" in path)).params["since"]
    usage = httpx.get(
        f"{gateway_url}/admin/usage",
        params={"group_by": "model", "since": since},
        headers=bearer(live.admin_key),
        timeout=30,
    ).json()
    assert usage["total"]["requests"] == 3
    assert page.text_content("#total-spend") == usd(usage["total"]["total_cost_usd"])
    assert table(page, "#series-table")[0] == [MODEL, MODEL, *usage_cells(usage["data"][0])]
    expect(page.locator("#spend-chart canvas")).to_have_count(1)

    with page.expect_download() as download:
        page.click("#export-csv")
    assert download.value.path().read_bytes().startswith(b"bucket,model,requests,")

    assert seen
    outside = [path for path in seen if not path.startswith(PREFIX + "/")]
    assert outside == ["/dashboard/"], "the page asked for something outside the prefix"
    asked = {path.split("?")[0] for path in seen}
    assert {f"{PREFIX}/dashboard/static/js/app.js", f"{PREFIX}/v1/usage/budget", f"{PREFIX}/admin/usage"} <= asked
