"""How keys look on the command line: every field in JSON and CSV, a summary in tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import click

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.usage import format_usd
from gateway.cli.output import emit

SHORT_ID = 8
_PER = {"total": "", "daily": "/day", "monthly": "/month"}


def key_row(info: ApiKeyInfo) -> dict[str, Any]:
    """Every field, flat: one CSV row, or a JSON object."""
    return {
        "id": info.id,
        "name": info.name,
        "prefix": info.prefix,
        "scope": info.scope,
        "status": info.status(datetime.now(UTC)),
        "owner": info.owner,
        "models": "all" if info.allowed_models is None else ",".join(info.allowed_models),
        "rpm": info.rpm,
        "tpm": info.tpm,
        "max_concurrency": info.max_concurrency,
        "budget_usd": None if info.budget_usd is None else format_usd(info.budget_usd),
        "budget_period": info.budget_period,
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        "revoked_at": None if info.revoked_at is None else info.revoked_at.isoformat(),
        "created_at": info.created_at.isoformat(),
        "metadata": json.dumps(info.metadata, sort_keys=True) if info.metadata else None,
    }


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
