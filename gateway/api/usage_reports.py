"""Usage reports over HTTP: ``GET /v1/usage`` (the calling key's own) and the filters it shares
with ``GET /admin/usage`` and the latency routes (``gateway.api.usage_insights``).

Query parameters: ``model``; ``since`` (inclusive) and ``until`` (exclusive) as an ISO date (its UTC
midnight), an ISO date-time (UTC unless it names a zone) or Unix seconds; ``group_by`` ``key``,
``model``, ``status``, ``day`` or ``hour`` (UTC days and hours: ``2025-01-31``,
``2025-01-31T13:00Z``); ``bucket`` ``hour`` or ``day`` to split every group by the UTC hour or day
its requests started in (each row then names its ``bucket``: the series of a chart); ``format``
``json`` (the default) or ``csv``. Amounts are USD as decimal strings, exact to ten places, so that
no client reads money as a float. The CSV is byte for byte what ``llama-gateway usage report
--format csv`` prints for the same filters (``gateway.accounting.usage.report_rows``).
Every value the gateway cannot read is a 400 naming its parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, cast

from litestar import Request, Response, get

from gateway.accounting.usage import BUCKETS, GROUPINGS, Bucket, GroupBy, UsageReport, UsageTotals, usage_report
from gateway.accounting.usage.report_rows import CSV_MEDIA_TYPE, report_csv
from gateway.api.auth import current_key
from gateway.errors import ApiError, echo, invalid_request
from gateway.state import gateway_state

AnyRequest = Request[Any, Any, Any]
FORMATS = ("json", "csv")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: GroupBy
    key_id: str | None
    model: str | None
    since: datetime | None
    until: datetime | None
    bucket: Bucket | None = None

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


def choice(request: AnyRequest, param: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    """A query parameter that must be one of ``allowed``; absent or empty gives ``default``."""
    value = request.query_params.get(param) or default
    if value is not None and value not in allowed:
        raise invalid_request(
            f"'{echo(value)}' is not a valid '{param}': use one of {', '.join(allowed)}.",
            param=param,
            code="invalid_value",
        )
    return value


def usage_query(request: AnyRequest, *, default_group: GroupBy, bucketed: bool = True) -> UsageQuery:
    """The report's filters from the query string; a bad value is a 400 naming its parameter.
    ``bucketed=False``: the route has no time buckets, and ``bucket`` is refused."""
    params = request.query_params
    group = cast(GroupBy, choice(request, "group_by", GROUPINGS, default_group))
    bucket = cast(Bucket | None, choice(request, "bucket", BUCKETS, None))
    if bucket is not None and not bucketed:
        raise invalid_request(
            "This route does not split groups by time: leave out 'bucket'.", param="bucket", code="invalid_value"
        )
    since = _moment(raw, "since") if (raw := params.get("since")) else None
    until = _moment(raw, "until") if (raw := params.get("until")) else None
    if since is not None and until is not None and since > until:
        raise invalid_request("'since' must not be later than 'until'.", param="since", code="invalid_value")
    for name in ("key", "model"):
        if "\x00" in (params.get(name) or ""):
            # No key id or model name holds one, and PostgreSQL refuses it in a text parameter (a 500).
            raise invalid_request(f"'{name}' must not contain a NUL character.", param=name, code="invalid_value")
    return UsageQuery(group, params.get("key") or None, params.get("model") or None, since, until, bucket)


def own_query(request: AnyRequest, *, default_group: GroupBy, bucketed: bool = True) -> UsageQuery:
    """``usage_query`` narrowed to the calling key; asking for another key's usage is a 403."""
    key = current_key(request)
    query = usage_query(request, default_group=default_group, bucketed=bucketed)
    if query.key_id is not None and query.key_id != key.id:
        raise ApiError(
            403,
            "This route reports the calling key's own usage; other keys' usage needs an admin key (/admin/usage).",
            type="permission_error",
            param="key",
            code="forbidden",
        )
    return replace(query, key_id=key.id)


def _usd(amount: Decimal) -> str:
    # Fixed-point: str() would write small amounts as "1.95E-7".
    return f"{amount:f}"


def _totals_json(totals: UsageTotals) -> dict[str, Any]:
    return {
        **({"bucket": totals.bucket} if totals.bucket is not None else {}),
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
        **({"bucket": report.bucket} if report.bucket is not None else {}),
        "filters": query.filters(),
        "data": [_totals_json(row) for row in report.rows],
        "total": _totals_json(report.total),
    }


async def run_report(request: AnyRequest, query: UsageQuery) -> Response[Any]:
    """The report as JSON, or as CSV with ``format=csv``."""
    csv = choice(request, "format", FORMATS, "json") == "csv"
    report = await usage_report(
        gateway_state(request).accounting.sessionmaker,
        group_by=query.group_by,
        bucket=query.bucket,
        key_id=query.key_id,
        model=query.model,
        since=query.since,
        until=query.until,
    )
    if not csv:
        return Response(report_json(report, query))
    name = f"usage-by-{query.group_by}" + (f"-{query.bucket}" if query.bucket else "")
    return Response(
        report_csv(report).encode(),
        media_type=CSV_MEDIA_TYPE,
        headers={"content-disposition": f'attachment; filename="{name}.csv"'},
    )


@get("/v1/usage")
async def own_usage(request: AnyRequest) -> Response[Any]:
    """The calling key's usage, grouped by UTC day unless asked otherwise."""
    return await run_report(request, own_query(request, default_group="day"))
