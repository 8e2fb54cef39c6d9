"""Usage reports over HTTP: ``GET /v1/usage`` (the calling key's own) and the filters it shares
with ``GET /admin/usage``.

Query parameters: ``model``; ``since`` (inclusive) and ``until`` (exclusive) as an ISO date (its UTC
midnight), an ISO date-time (UTC unless it names a zone) or Unix seconds; ``group_by`` ``key``,
``model`` or ``day`` (UTC days). Amounts are USD as decimal strings, exact to ten places, so that no
client reads money as a float.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, cast, get_args

from litestar import Request, get

from gateway.accounting.usage import GroupBy, UsageReport, UsageTotals, usage_report
from gateway.api.auth import current_key
from gateway.errors import ApiError, echo, invalid_request
from gateway.state import gateway_state

AnyRequest = Request[Any, Any, Any]
GROUPINGS: tuple[str, ...] = get_args(GroupBy)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: GroupBy
    key_id: str | None
    model: str | None
    since: datetime | None
    until: datetime | None

    def filters(self) -> dict[str, str | None]:
        return {
            "key": self.key_id,
            "model": self.model,
            "since": None if self.since is None else self.since.isoformat(),
            "until": None if self.until is None else self.until.isoformat(),
        }


def _moment(text: str, param: str) -> datetime:
    value = text.strip()
    try:
        if value.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(value), UTC)
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = datetime.combine(date.fromisoformat(value), time())
        if parsed.tzinfo is not None:
            # Years 1 and 9999 with an offset fall outside what datetime holds once in UTC.
            parsed = parsed.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        raise invalid_request(
            f"'{echo(text)}' is not a valid '{param}': give an ISO date (2025-01-31), an ISO date-time"
            " or Unix seconds.",
            param=param,
            code="invalid_value",
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def usage_query(request: AnyRequest, *, default_group: GroupBy) -> UsageQuery:
    """The report's filters from the query string; a bad value is a 400 naming its parameter."""
    params = request.query_params
    group: str = params.get("group_by") or default_group
    if group not in GROUPINGS:
        raise invalid_request(
            f"'{echo(group)}' is not a valid 'group_by': use one of {', '.join(GROUPINGS)}.",
            param="group_by",
            code="invalid_value",
        )
    since = _moment(raw, "since") if (raw := params.get("since")) else None
    until = _moment(raw, "until") if (raw := params.get("until")) else None
    if since is not None and until is not None and since > until:
        raise invalid_request("'since' must not be later than 'until'.", param="since", code="invalid_value")
    for name in ("key", "model"):
        if "\x00" in (params.get(name) or ""):
            # No key id or model name holds one, and PostgreSQL refuses it in a text parameter (a 500).
            raise invalid_request(f"'{name}' must not contain a NUL character.", param=name, code="invalid_value")
    return UsageQuery(cast(GroupBy, group), params.get("key") or None, params.get("model") or None, since, until)


def _usd(amount: Decimal) -> str:
    # Fixed-point: str() would write small amounts as "1.95E-7".
    return f"{amount:f}"


def _totals_json(totals: UsageTotals) -> dict[str, Any]:
    return {
        "group": totals.group,
        "label": totals.label,
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.total_tokens,
        "input_cost_usd": _usd(totals.input_cost),
        "output_cost_usd": _usd(totals.output_cost),
        "total_cost_usd": _usd(totals.total_cost),
    }


def report_json(report: UsageReport, query: UsageQuery) -> dict[str, Any]:
    return {
        "object": "usage_report",
        "group_by": report.group_by,
        "filters": query.filters(),
        "data": [_totals_json(row) for row in report.rows],
        "total": _totals_json(report.total),
    }


async def run_report(request: AnyRequest, query: UsageQuery) -> dict[str, Any]:
    report = await usage_report(
        gateway_state(request).accounting.sessionmaker,
        group_by=query.group_by,
        key_id=query.key_id,
        model=query.model,
        since=query.since,
        until=query.until,
    )
    return report_json(report, query)


@get("/v1/usage")
async def own_usage(request: AnyRequest) -> dict[str, Any]:
    """The calling key's usage, grouped by UTC day unless asked otherwise."""
    key = current_key(request)
    query = usage_query(request, default_group="day")
    if query.key_id is not None and query.key_id != key.id:
        raise ApiError(
            403,
            "This route reports the calling key's own usage; other keys' usage needs an admin key (/admin/usage).",
            type="permission_error",
            param="key",
            code="forbidden",
        )
    return await run_report(request, UsageQuery(query.group_by, key.id, query.model, query.since, query.until))
