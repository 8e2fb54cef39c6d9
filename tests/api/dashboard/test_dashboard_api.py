"""What the dashboard reads: usage by UTC hour and by status, series split into time buckets,
latency percentiles, budget standing, and CSV byte for byte the command line's; a user key only
ever reaches its own; every bad value a 400 naming its parameter. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest

from gateway.accounting.usage import UsageEntry
from tests.support.gateways import admin_client, bearer, create_key, gateway, scripted_model, shared_database
from tests.support.live import LiveGateway
from tests.support.usage_data import cli_usage_csv, entry, in_own_loop, insert_usage

if TYPE_CHECKING:
    from conftest import PostgresServer

BIG, SMALL = "llama-2-70b-chat", "llama-2-7b-chat"
MODELS = [
    scripted_model(BIG, price_in="0.65", price_out="2.75"),
    scripted_model(SMALL, price_in="0.05", price_out="0.25"),
]
DAY = datetime(2025, 3, 3, tzinfo=UTC)
WINDOW = {"since": "2025-03-03", "until": "2025-03-05"}


class Seeded:
    def __init__(self, live: LiveGateway, url: str) -> None:
        self.live, self.url = live, url
        self.alice_id, self.alice = create_key(live, name="alice")
        self.bob_id, self.bob = create_key(live, name="bob")
        self.entries: list[UsageEntry] = []

    def history(self) -> list[UsageEntry]:
        """Rows over two UTC days, several hours, both models, every kind of outcome."""
        a, b, hour = self.alice_id, self.bob_id, timedelta(hours=1)
        small = ("0.05", "0.25")
        return [
            entry("h1", a, BIG, DAY + 9 * hour + timedelta(minutes=15), ttft_ms=40, duration_ms=300),
            entry("h2", a, BIG, DAY + 9 * hour + timedelta(minutes=45), ttft_ms=120, duration_ms=900, prompt_tokens=7),
            entry("h3", a, BIG, DAY + 10 * hour + timedelta(minutes=5), ttft_ms=75, duration_ms=650),
            entry("h4", a, BIG, DAY + 10 * hour + timedelta(minutes=30), status="failed", ttft_ms=None, duration_ms=30),
            entry("h5", a, BIG, DAY + 32 * hour, status="length", completion_tokens=64, ttft_ms=33, duration_ms=2000),
            entry(
                "h6", b, SMALL, DAY + 9 * hour + timedelta(minutes=20), status="cancelled", ttft_ms=None, prices=small
            ),
            entry("h7", b, SMALL, DAY + 36 * hour, ttft_ms=210, duration_ms=1500, prices=small, prompt_tokens=3001),
        ]


@pytest.fixture(scope="module")
async def seeded(
    database_server: PostgresServer | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Seeded]:
    async with shared_database(database_server, tmp_path_factory.mktemp("dashboard-api")) as url:
        with gateway(url, MODELS) as live:
            data = Seeded(live, url)
            data.entries = data.history()
            await insert_usage(url, data.entries)
            yield data


@pytest.fixture
def admin(seeded: Seeded) -> Iterator[httpx.Client]:
    with admin_client(seeded.live) as client:
        yield client


def as_key(seeded: Seeded, key: str) -> httpx.Client:
    return httpx.Client(base_url=seeded.live.base_url, headers=bearer(key), timeout=60)


def hour_of(row: UsageEntry) -> str:
    return row.started_at.strftime("%Y-%m-%dT%H:00Z")


def expected(entries: list[UsageEntry], group: Callable[[UsageEntry], tuple[str, ...]]) -> dict[tuple[str, ...], Any]:
    """(requests, prompt tokens, completion tokens, total cost) by group, computed from the rows."""
    totals: defaultdict[tuple[str, ...], list[Any]] = defaultdict(lambda: [0, 0, 0, Decimal(0)])
    for row in entries:
        found = totals[group(row)]
        found[0] += 1
        found[1] += row.prompt_tokens
        found[2] += row.completion_tokens
        found[3] += row.total_cost
    return {name: tuple(values) for name, values in totals.items()}


def answered(report: dict[str, Any], *fields: str) -> dict[tuple[str, ...], Any]:
    rows = report["data"]
    return {
        tuple(row[f] for f in fields): (
            row["requests"],
            row["prompt_tokens"],
            row["completion_tokens"],
            Decimal(row["total_cost_usd"]),
        )
        for row in rows
    }


def test_usage_by_hour_day_and_status(seeded: Seeded, admin: httpx.Client) -> None:
    rows = seeded.entries
    by_hour = admin.get("/admin/usage", params={**WINDOW, "group_by": "hour"}).json()
    assert by_hour["group_by"] == "hour"
    assert [row["group"] for row in by_hour["data"]] == sorted({hour_of(r) for r in rows})
    assert answered(by_hour, "group") == expected(rows, lambda r: (hour_of(r),))
    assert by_hour["total"]["requests"] == len(rows)

    by_day = admin.get("/admin/usage", params={**WINDOW, "group_by": "day"}).json()
    assert answered(by_day, "group") == expected(rows, lambda r: (r.started_at.date().isoformat(),))

    by_status = admin.get("/admin/usage", params={**WINDOW, "group_by": "status"}).json()
    assert answered(by_status, "group") == expected(rows, lambda r: (r.status,))
    assert [row["group"] for row in by_status["data"]] == sorted({r.status for r in rows})


@pytest.mark.parametrize(("bucket", "group_by"), [("hour", "model"), ("day", "key"), ("hour", "status")])
def test_buckets_split_every_group_by_time(seeded: Seeded, admin: httpx.Client, bucket: str, group_by: str) -> None:
    report = admin.get("/admin/usage", params={**WINDOW, "group_by": group_by, "bucket": bucket}).json()
    assert (report["group_by"], report["bucket"]) == (group_by, bucket)

    def time_of(row: UsageEntry) -> str:
        return hour_of(row) if bucket == "hour" else row.started_at.date().isoformat()

    def group_of(row: UsageEntry) -> str:
        return {"model": row.model, "key": row.key_id, "status": row.status}[group_by]

    assert answered(report, "bucket", "group") == expected(seeded.entries, lambda r: (time_of(r), group_of(r)))
    assert [(row["bucket"], row["group"]) for row in report["data"]] == sorted(answered(report, "bucket", "group"))
    if group_by == "key":
        names = {seeded.alice_id: "alice", seeded.bob_id: "bob"}
        assert all(row["label"] == names[row["group"]] for row in report["data"])
    unbucketed = admin.get("/admin/usage", params={**WINDOW, "group_by": group_by}).json()
    assert report["total"] == unbucketed["total"]
    assert "bucket" not in unbucketed


def nearest_rank(values: list[int], percentile: int) -> int | None:
    # numpy's "inverted_cdf" is the nearest-rank definition: computed apart from the gateway's code.
    return int(np.percentile(values, percentile, method="inverted_cdf")) if values else None


def percentiles(rows: list[UsageEntry]) -> dict[str, Any]:
    ttft = [r.ttft_ms for r in rows if r.ttft_ms is not None]
    duration = [r.duration_ms for r in rows]
    return {
        "requests": len(rows),
        "ttft": {"count": len(ttft), **{f"p{p}_ms": nearest_rank(ttft, p) for p in (50, 90, 99)}},
        "duration": {"count": len(duration), **{f"p{p}_ms": nearest_rank(duration, p) for p in (50, 90, 99)}},
    }


def test_latency_percentiles_are_nearest_rank_over_the_rows(seeded: Seeded, admin: httpx.Client) -> None:
    report = admin.get("/admin/usage/latency", params=WINDOW).json()
    assert (report["object"], report["group_by"]) == ("usage_latency", "model")
    for row in report["data"]:
        mine = [r for r in seeded.entries if r.model == row["group"]]
        assert {k: row[k] for k in ("requests", "ttft", "duration")} == percentiles(mine)
    assert {k: report["total"][k] for k in ("requests", "ttft", "duration")} == percentiles(seeded.entries)

    by_key = admin.get("/admin/usage/latency", params={**WINDOW, "group_by": "key"}).json()
    assert [(row["group"], row["label"]) for row in by_key["data"]] == sorted(
        [(seeded.alice_id, "alice"), (seeded.bob_id, "bob")]
    )
    with as_key(seeded, seeded.bob) as bob:
        own = bob.get("/v1/usage/latency", params=WINDOW).json()
    bobs = [r for r in seeded.entries if r.key_id == seeded.bob_id]
    assert {k: own["total"][k] for k in ("requests", "ttft", "duration")} == percentiles(bobs)
    assert own["filters"]["key"] == seeded.bob_id
    empty = admin.get("/admin/usage/latency", params={"until": "2001-01-01"}).json()
    assert empty["data"] == []
    assert empty["total"]["ttft"] == {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}


def test_budgets_show_spend_in_the_current_period(seeded: Seeded, admin: httpx.Client) -> None:
    daily_id, daily = create_key(seeded.live, name="daily", budget_usd="1.5", budget_period="daily")
    spent_id, _ = create_key(seeded.live, name="revoked soon", budget_usd="1")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    today_row = entry("b1", daily_id, BIG, today, prompt_tokens=10_000, completion_tokens=1000)
    yesterday_row = entry("b2", daily_id, BIG, today - timedelta(seconds=1), prompt_tokens=50_000)
    in_own_loop(lambda: insert_usage(seeded.url, [today_row, yesterday_row]))
    admin.post(f"/admin/keys/{spent_id}/revoke").raise_for_status()

    with as_key(seeded, daily) as own:
        status = own.get("/v1/usage/budget").json()
    assert status["object"] == "key_budget"
    assert (status["key"]["id"], status["key"]["budget_usd"], status["key"]["budget_period"]) == (
        daily_id,
        "1.50",
        "daily",
    )
    assert datetime.fromisoformat(status["period_start"]) == today
    assert Decimal(status["spent_usd"]) == today_row.total_cost
    assert Decimal(status["remaining_usd"]) == Decimal("1.5") - today_row.total_cost

    every = {row["key"]["id"]: row for row in admin.get("/admin/usage/budgets").json()["data"]}
    assert every[daily_id] == status
    assert spent_id not in every
    alice = every[seeded.alice_id]
    # No budget: its spend of all time, nothing "left".
    assert (alice["period_start"], alice["remaining_usd"]) == (None, None)
    assert Decimal(alice["spent_usd"]) == sum(
        (r.total_cost for r in seeded.entries if r.key_id == seeded.alice_id), Decimal(0)
    )


CSV_QUERIES = [
    {"group_by": "model", "bucket": "day"},
    {"group_by": "key", "bucket": "hour"},
    {"group_by": "status"},
    {"group_by": "hour", "model": BIG},
    {"group_by": "key"},
]


@pytest.mark.parametrize("query", CSV_QUERIES, ids=[",".join(q.values()) for q in CSV_QUERIES])
def test_csv_is_the_command_lines_csv(seeded: Seeded, admin: httpx.Client, query: dict[str, str]) -> None:
    response = admin.get("/admin/usage", params={**WINDOW, **query, "format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith('attachment; filename="usage-by-')
    options = [arg for name, value in {**WINDOW, **query}.items() for arg in (f"--{name.replace('_', '-')}", value)]
    assert response.content == cli_usage_csv(seeded.url, *options)
    assert response.content.count(b"\r\n") >= 2  # a header, rows, and the total


def test_a_user_keys_csv_is_the_command_lines_for_that_key(seeded: Seeded) -> None:
    with as_key(seeded, seeded.alice) as alice:
        response = alice.get("/v1/usage", params={**WINDOW, "group_by": "model", "bucket": "hour", "format": "csv"})
    assert response.status_code == 200
    expected_csv = cli_usage_csv(
        seeded.url, "--key", seeded.alice_id, "--group-by", "model", "--bucket", "hour", *_window_options()
    )
    assert response.content == expected_csv
    assert SMALL.encode() not in response.content


def _window_options() -> list[str]:
    return ["--since", WINDOW["since"], "--until", WINDOW["until"]]


ADMIN_READS = ["/admin/usage", "/admin/usage/latency", "/admin/usage/budgets", "/admin/keys"]


def test_a_user_key_reaches_only_its_own_usage(seeded: Seeded) -> None:
    with as_key(seeded, seeded.alice) as alice:
        for path in ADMIN_READS:
            response = alice.get(path)
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "forbidden"
        for path in ("/v1/usage", "/v1/usage/latency"):
            refused = alice.get(path, params={"key": seeded.bob_id})
            assert refused.status_code == 403, path
            assert refused.json()["error"]["param"] == "key"
        own = alice.get("/v1/usage", params={**WINDOW, "group_by": "key"}).json()
        assert [row["group"] for row in own["data"]] == [seeded.alice_id]
        statuses = alice.get("/v1/usage", params={**WINDOW, "group_by": "status"}).json()
        assert statuses["total"]["requests"] == sum(1 for r in seeded.entries if r.key_id == seeded.alice_id)
        budget = alice.get("/v1/usage/budget").json()
        assert budget["key"]["id"] == seeded.alice_id
        assert "bob" not in str(budget)


BAD_VALUES = [
    ({"group_by": "week"}, "group_by"),
    ({"bucket": "minute"}, "bucket"),
    ({"format": "xlsx"}, "format"),
    ({"since": "soon"}, "since"),
    ({"until": "2025-13-01"}, "until"),
    ({"since": "2025-02-01", "until": "2025-01-01"}, "since"),
    ({"model": "a\x00b"}, "model"),
]
LATENCY_BAD_VALUES = [
    ({"group_by": "week"}, "group_by"),
    ({"bucket": "hour"}, "bucket"),
    ({"since": "99999999999999999999"}, "since"),
    ({"key": "\x00"}, "key"),
]


@pytest.mark.parametrize("path", ["/admin/usage", "/v1/usage"])
@pytest.mark.parametrize(("params", "param"), BAD_VALUES, ids=[p for _, p in BAD_VALUES])
def test_bad_report_values_are_400_naming_the_parameter(
    seeded: Seeded, path: str, params: dict[str, str], param: str
) -> None:
    check_refusal(seeded, path, params, param)


@pytest.mark.parametrize("path", ["/admin/usage/latency", "/v1/usage/latency"])
@pytest.mark.parametrize(("params", "param"), LATENCY_BAD_VALUES, ids=[p for _, p in LATENCY_BAD_VALUES])
def test_bad_latency_values_are_400_naming_the_parameter(
    seeded: Seeded, path: str, params: dict[str, str], param: str
) -> None:
    if path.startswith("/v1") and param == "key":
        params = {"key": seeded.alice_id + "\x00"}
    check_refusal(seeded, path, params, param)


def check_refusal(seeded: Seeded, path: str, params: dict[str, str], param: str) -> None:
    key = seeded.live.admin_key if path.startswith("/admin") else seeded.alice
    with as_key(seeded, key) as client:
        response = client.get(path, params=params)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
