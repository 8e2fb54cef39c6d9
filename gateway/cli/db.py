"""``llama-gateway db upgrade``: apply pending migrations."""

from __future__ import annotations

import click

from gateway.cli.common import config_option, run_async, settings_from
from gateway.db import head_revision, safe_url, upgrade_database


@click.group()
def db() -> None:
    """Manage the database schema."""


@db.command()
@config_option
@run_async
async def upgrade(config_path: str | None) -> None:
    """Apply pending migrations (run once per release, before starting replicas on PostgreSQL)."""
    url = settings_from(config_path).database_url
    await upgrade_database(url)
    click.echo(f"Database {safe_url(url)} is at migration {head_revision()}.")
