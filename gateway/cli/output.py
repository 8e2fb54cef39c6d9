"""Tables, JSON and CSV for the command line's list and report commands."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from gateway.accounting.usage.report_rows import csv_text


def emit(rows: Sequence[Mapping[str, Any]], fmt: str, *, title: str | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if fmt == "csv":
        click.echo(csv_text(rows), nl=False)
        return
    columns = list(rows[0]) if rows else []
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row[c] is None else str(row[c]) for c in columns))
    Console().print(table)
