"""Driving the usage dashboard in a browser tab, and what its tables should show for API answers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from playwright.sync_api import Page

from gateway.accounting.usage import format_usd


def sign_in(page: Page, base_url: str, key: str) -> None:
    """Open the dashboard at ``base_url + /dashboard/``, sign in, and wait for its first views."""
    page.goto(f"{base_url}/dashboard/")
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#board:not([hidden])")
    wait_until_loaded(page)


def wait_until_loaded(page: Page) -> None:
    page.wait_for_selector("body[data-state='ready']", state="attached")


def show(page: Page, *, since: str, until: str, bucket: str = "day", by: str = "model") -> None:
    """Choose a range of UTC dates, a bucket and a grouping, and wait for the views to load."""
    page.select_option("#range", "custom")
    page.fill("#since", since)
    page.fill("#until", until)
    page.select_option("#bucket", bucket)
    page.select_option("#group", by)
    page.click("#refresh")
    wait_until_loaded(page)


def table(page: Page, selector: str) -> list[list[str]]:
    """A table's body rows as ``[data-group or data-key, cell texts...]``."""
    rows: list[list[str]] = page.eval_on_selector_all(
        f"{selector} tbody tr",
        "rows => rows.map(r => [r.dataset.group ?? r.dataset.key ?? '', ...[...r.cells].map(c => c.textContent)])",
    )
    return rows


def usd(amount: str | None) -> str:
    return "–" if amount is None else "$" + format_usd(Decimal(amount))


def count(value: int) -> str:
    return f"{value:,}"


def ms(value: int | None) -> str:
    return "–" if value is None else f"{value:,} ms"


def usage_cells(row: dict[str, Any]) -> list[str]:
    """What the page shows of a usage report row, after its name."""
    return [
        count(row["requests"]),
        count(row["prompt_tokens"]),
        count(row["completion_tokens"]),
        count(row["total_tokens"]),
        usd(row["total_cost_usd"]),
    ]


def latency_cells(row: dict[str, Any]) -> list[str]:
    ttft, duration = row["ttft"], row["duration"]
    return [count(row["requests"]), *(ms(part[f"p{p}_ms"]) for part in (ttft, duration) for p in (50, 90, 99))]
