"""``llama-gateway keys``: create, list, show, update and revoke API keys."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click
import msgspec

from gateway.accounting.keys import ApiKeyInfo, KeyNotFound, KeyStore, KeyUpdate, NewKey
from gateway.cli.common import (
    BUDGET,
    EXPIRY,
    LIMIT,
    MODELS,
    config_option,
    format_option,
    run_async,
    settings_from,
    with_database,
)
from gateway.cli.key_rows import key_row, key_summary, show_key
from gateway.cli.output import emit


def _metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--metadata")
        metadata[name] = value
    return metadata


async def _find(store: KeyStore, given: str) -> ApiKeyInfo:
    """The key whose id is ``given`` or, uniquely, begins with it (tables show 8 characters)."""
    if (exact := await store.get(given)) is not None:
        return exact
    matches = [info for info in await store.list() if info.id.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise KeyNotFound(f"{given!r} begins {len(matches)} key ids; give more of the id")
    raise KeyNotFound(f"no API key has id {given!r}")


@click.group()
def keys() -> None:
    """Manage API keys (stored as hashes: a key is shown once, when created)."""


def _limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--owner", help="Who the key belongs to (a person, team or service)."),
        click.option("--scope", type=click.Choice(["user", "admin"]), help="admin may use /admin routes."),
        click.option("--models", type=MODELS, help="Comma-separated models the key may use, or 'all'."),
        click.option("--rpm", type=LIMIT, help="Requests per minute, or 'none'."),
        click.option("--tpm", type=LIMIT, help="Tokens (prompt + max completion) per minute, or 'none'."),
        click.option("--max-concurrency", type=LIMIT, help="Requests in flight at once, or 'none'."),
        click.option("--budget", type=BUDGET, help="Spending limit in USD per budget period, or 'none'."),
        click.option("--budget-period", type=click.Choice(["total", "daily", "monthly"])),
        click.option("--expires", type=EXPIRY, help="ISO date/time (UTC), a duration (30d), or 'never'."),
        click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Free-form labels (repeatable)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _given(params: dict[str, Any]) -> dict[str, Any]:
    """The options the operator gave, named as key fields."""
    renames = {"models": "allowed_models", "budget": "budget_usd", "expires": "expires_at"}
    given = {
        renames.get(name, name): value
        for name, value in params.items()
        if click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    }
    if "metadata" in given:
        given["metadata"] = _metadata(given["metadata"])
    return given


@keys.command()
@config_option
@click.option("--name", required=True, help="What the key is for.")
@_limit_options
@click.option("--json", "as_json", is_flag=True, help="Print the key and its fields as one JSON object.")
@run_async
async def create(config_path: str | None, name: str, as_json: bool, **options: Any) -> None:
    """Create a key and print it (the only time it is shown)."""
    fields = {"name": name, **_given(options)}
    new = msgspec.convert({k: v for k, v in fields.items() if v is not None}, NewKey)
    info, plaintext = await with_database(
        settings_from(config_path), lambda sm: KeyStore(sm, cache_seconds=0).create(new)
    )
    if as_json:
        click.echo(json.dumps({"key": plaintext, **key_row(info), "metadata": info.metadata}, indent=2))
        return
    click.echo(f"Created key {info.id} ({info.name}, scope {info.scope}).")
    click.echo("This is the only time the key is shown. Store it now:\n")
    click.echo(f"    {plaintext}\n")


@keys.command("list")
@config_option
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@format_option
@run_async
async def list_keys(config_path: str | None, include_revoked: bool, fmt: str) -> None:
    """List keys (never their secrets)."""
    found = await with_database(
        settings_from(config_path), lambda sm: KeyStore(sm).list(include_revoked=include_revoked)
    )
    rows = [key_summary(info) if fmt == "table" else key_row(info) for info in found]
    emit(rows, fmt, title="API keys")


@keys.command()
@config_option
@click.argument("key_id")
@format_option
@run_async
async def show(config_path: str | None, key_id: str, fmt: str) -> None:
    """Show one key's fields."""
    info = await with_database(settings_from(config_path), lambda sm: _find(KeyStore(sm), key_id))
    show_key(info, fmt)


@keys.command()
@config_option
@click.argument("key_id")
@click.option("--name", help="What the key is for.")
@_limit_options
@format_option
@run_async
async def update(config_path: str | None, key_id: str, fmt: str, **options: Any) -> None:
    """Change a key's fields; options left out keep their value."""
    changes = _given(options)
    if not changes:
        raise click.UsageError("give at least one option to change")
    update = msgspec.convert(changes, KeyUpdate)

    async def change(store: KeyStore) -> ApiKeyInfo:
        return await store.update((await _find(store, key_id)).id, update)

    info = await with_database(settings_from(config_path), lambda sm: change(KeyStore(sm)))
    show_key(info, fmt)


@keys.command()
@config_option
@click.argument("key_id")
@format_option
@run_async
async def revoke(config_path: str | None, key_id: str, fmt: str) -> None:
    """Revoke a key: every replica refuses it within a few seconds (key_cache_seconds)."""

    async def revoke_found(store: KeyStore) -> ApiKeyInfo:
        return await store.revoke((await _find(store, key_id)).id)

    info = await with_database(settings_from(config_path), lambda sm: revoke_found(KeyStore(sm)))
    if fmt == "table":
        click.echo(f"Revoked key {info.id} ({info.name}, {info.prefix}).")
    else:
        show_key(info, fmt)
