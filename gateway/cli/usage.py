"""``llama-gateway usage report``: requests, tokens and USD by key, model or day."""

from __future__ import annotations

import json
from datetime import datetime

import click

from gateway.accounting.usage import GroupBy, UsageTotals, format_usd, usage_report
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


def _row(totals: UsageTotals, group_by: GroupBy, *, for_table: bool) -> dict[str, object]:
    amounts = (totals.input_cost, totals.output_cost, totals.total_cost)
    names = ("input $", "output $", "total $") if for_table else ("input_usd", "output_usd", "total_usd")
    return {
        group_by: totals.group,
        **({"name": totals.label} if group_by == "key" else {}),
        "requests": totals.requests,
        ("prompt" if for_table else "prompt_tokens"): totals.prompt_tokens,
        ("completion" if for_table else "completion_tokens"): totals.completion_tokens,
        **{name: format_usd(amount) for name, amount in zip(names, amounts, strict=True)},
    }


@click.group()
def usage() -> None:
    """Report usage and spend recorded per request."""


@usage.command()
@config_option
@click.option("--key", "key_id", help="Only this key (its id).")
@click.option("--model", help="Only this model.")
@click.option("--since", type=Moment(), help="From this UTC date or time (inclusive).")
@click.option("--until", type=Moment(), help="Up to this UTC date or time (exclusive).")
@click.option("--group-by", type=click.Choice(["key", "model", "day"]), default="key", show_default=True)
@format_option
@run_async
async def report(
    config_path: str | None,
    key_id: str | None,
    model: str | None,
    since: datetime | None,
    until: datetime | None,
    group_by: GroupBy,
    fmt: str,
) -> None:
    """Requests, tokens and USD grouped by key, model or UTC day, with totals."""
    result = await with_database(
        settings_from(config_path),
        lambda sm: usage_report(sm, group_by=group_by, key_id=key_id, model=model, since=since, until=until),
    )
    if fmt == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    for_table = fmt == "table"
    rows = [_row(totals, group_by, for_table=for_table) for totals in result.rows]
    total = _row(result.total, group_by, for_table=for_table)
    # The total is a row of its own in CSV and tables, so that spreadsheets and eyes find it alike.
    emit([*rows, total], fmt, title=f"Usage by {group_by}")
