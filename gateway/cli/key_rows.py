"""How keys look on the command line: every field in JSON and CSV, a summary in tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from gateway.accounting.keys import ApiKeyInfo, key_fields
from gateway.accounting.usage import format_usd
from gateway.cli.output import emit

SHORT_ID = 8
_PER = {"total": "", "daily": "/day", "monthly": "/month"}


def key_row(info: ApiKeyInfo) -> dict[str, Any]:
    """Every field, flat: one CSV row, or a JSON object (models joined, metadata as JSON text)."""
    fields = key_fields(info).items()
    return {("models" if name == "allowed_models" else name): _flat(name, value) for name, value in fields}


def _flat(name: str, value: Any) -> Any:
    if name == "allowed_models":
        return "all" if value is None else ",".join(value)
    if name == "metadata":
        return json.dumps(value, sort_keys=True) if value else None
    return value


def key_summary(info: ApiKeyInfo) -> dict[str, Any]:
    """What fits a terminal's width; ``keys show`` has the rest."""
    limits = [
        f"{value} {unit}"
        for value, unit in ((info.rpm, "rpm"), (info.tpm, "tpm"), (info.max_concurrency, "at once"))
        if value is not None
    ]
    budget = "" if info.budget_usd is None else f"${format_usd(info.budget_usd)}{_PER[info.budget_period]}"
    return {
        "id": info.id[:SHORT_ID],  # any unique beginning of an id is accepted by show/update/revoke
        "name": info.name,
        "key": info.prefix,
        "scope": info.scope,
        "status": info.status(datetime.now(UTC)),
        "models": "all" if info.allowed_models is None else ",".join(info.allowed_models),
        "limits": ", ".join(limits),
        "budget": budget,
        "expires": "" if info.expires_at is None else info.expires_at.strftime("%Y-%m-%d %H:%M"),
    }


def show_key(info: ApiKeyInfo, fmt: str) -> None:
    row = key_row(info)
    if fmt == "json":
        click.echo(json.dumps({**row, "metadata": info.metadata}, indent=2))
    elif fmt == "csv":
        emit([row], "csv")
    else:
        emit([{"field": k, "value": "" if v is None else v} for k, v in row.items()], "table")
