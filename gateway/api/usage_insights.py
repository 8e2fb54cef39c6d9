"""Latency percentiles and budget standing over HTTP, beside the usage reports.

``GET /v1/usage/latency`` (the calling key's requests) and ``GET /admin/usage/latency`` (everyone's,
``key`` narrows it) answer time-to-first-token and duration percentiles (p50, p90, p99, in
milliseconds, nearest-rank over the usage rows) per ``group_by`` group (``model`` unless asked
otherwise; any grouping of the usage reports) and over all of them; they take the reports'
``model``, ``since`` and ``until`` filters. ``GET /v1/usage/budget`` answers the calling key's
fields (its limits) with what it spent in its current budget period and what is left;
``GET /admin/usage/budgets`` the same for every key that is not revoked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Request, get

from gateway.accounting.budget_status import budget_statuses
from gateway.accounting.usage.latency import LatencyReport, latency_report
from gateway.api.auth import current_key
from gateway.api.usage_reports import UsageQuery, own_query, usage_query
from gateway.state import gateway_state

AnyRequest = Request[Any, Any, Any]


def latency_json(report: LatencyReport, query: UsageQuery) -> dict[str, Any]:
    return {
        "object": "usage_latency",
        "group_by": report.group_by,
        "filters": query.filters(),
        "data": [row.as_dict() for row in report.rows],
        "total": report.total.as_dict(),
    }


async def run_latency(request: AnyRequest, query: UsageQuery) -> dict[str, Any]:
    report = await latency_report(
        gateway_state(request).accounting.sessionmaker,
        group_by=query.group_by,
        key_id=query.key_id,
        model=query.model,
        since=query.since,
        until=query.until,
    )
    return latency_json(report, query)


@get("/v1/usage/latency")
async def own_latency(request: AnyRequest) -> dict[str, Any]:
    """The calling key's latency percentiles, by model unless asked otherwise."""
    return await run_latency(request, own_query(request, default_group="model", bucketed=False))


@get("/usage/latency")
async def all_latency(request: AnyRequest) -> dict[str, Any]:
    """Every key's latency percentiles (``key`` narrows it to one), by model unless asked otherwise."""
    return await run_latency(request, usage_query(request, default_group="model", bucketed=False))


@get("/v1/usage/budget")
async def own_budget(request: AnyRequest) -> dict[str, Any]:
    """The calling key's limits, and its spend and what is left in the current budget period."""
    state = gateway_state(request)
    (status,) = await budget_statuses(state.accounting.sessionmaker, [current_key(request)], datetime.now(UTC))
    return status.as_dict()


@get("/usage/budgets")
async def all_budgets(request: AnyRequest) -> dict[str, Any]:
    """Every key that is not revoked, with its spend and what is left in its current budget period."""
    state = gateway_state(request)
    keys = await state.accounting.keys.list(include_revoked=False)
    statuses = await budget_statuses(state.accounting.sessionmaker, keys, datetime.now(UTC))
    return {"object": "list", "data": [status.as_dict() for status in statuses]}
