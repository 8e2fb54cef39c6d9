"""``llama-gateway usage report``: requests, tokens and USD by key, model, status, UTC day or hour."""

from __future__ import annotations

import json
from datetime import datetime

import click

from gateway.accounting.usage import BUCKETS, GROUPINGS, Bucket, GroupBy, usage_report
from gateway.accounting.usage.report_rows import report_csv, report_rows
from gateway.cli.common import (
    config_option,
    format_option,
    moment,
    run_async,
    settings_from,
    with_database,
)
from gateway.cli.output import emit


class Moment(click.ParamType[datetime]):
    name = "date"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return moment(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an ISO date (2025-01-31) or date-time", param, ctx)


@click.group()
def usage() -> None:
    """Report usage and spend recorded per request."""


@usage.command()
@config_option
@click.option("--key", "key_id", help="Only this key (its id).")
@click.option("--model", help="Only this model.")
@click.option("--since", type=Moment(), help="From this UTC date or time (inclusive).")
@click.option("--until", type=Moment(), help="Up to this UTC date or time (exclusive).")
@click.option("--group-by", type=click.Choice(GROUPINGS), default="key", show_default=True)
@click.option("--bucket", type=click.Choice(BUCKETS), help="Split each group by the UTC hour or day.")
@format_option
@run_async
async def report(
    config_path: str | None,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    group_by: GroupBy,
    bucket: Bucket | None,
    fmt: str,
) -> None:
    """Requests, tokens and USD grouped by key, model, status, UTC day or UTC hour, with totals.

    The CSV is the one the HTTP API answers for ``format=csv`` with the same filters."""
    result = await with_database(
        settings_from(config_path),
        lambda sm: usage_report(
            sm, group_by=group_by, bucket=bucket, key_id=key_id, model=model, since=since, until=until
        ),
    )
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    elif fmt == "csv":
        click.echo(report_csv(result), nl=False)
    else:
        title = f"Usage by {group_by}" + (f" and {bucket}" if bucket else "")
        emit(report_rows(result, for_table=True), fmt, title=title)
