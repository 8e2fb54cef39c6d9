"""What the admin commands share: settings, opening the database, option types, errors."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import click
import msgspec
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.keys import InvalidKeyFields, KeyNotFound
from gateway.db import DatabaseNotReady
from gateway.settings import ConfigError, Settings, load_settings

CLEAR_WORDS = ("none", "unlimited", "never", "all")
FORMATS = click.Choice(["table", "json", "csv"])

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="LLAMA_GATEWAY_CONFIG",
    help="YAML config file (default: the embedded SQLite file and bundled model); "
    "LLAMA_GATEWAY_<NAME> overrides any top-level setting, e.g. LLAMA_GATEWAY_DATABASE_URL.",
)
format_option = click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)


def settings_from(config_path: str | None) -> Settings:
    try:
        return load_settings(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def run_async[**P](command: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async command body, turning the errors an operator can act on into messages."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            asyncio.run(command(*args, **kwargs))
        except (DatabaseNotReady, KeyNotFound, InvalidKeyFields, ConfigError, msgspec.ValidationError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


async def with_database[T](settings: Settings, work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    from gateway.accounting.services import open_database

    engine, sessionmaker = await open_database(settings.database_url)
    try:
        return await work(sessionmaker)
    finally:
        await engine.dispose()


class Clearable(click.ParamType[Any]):
    """A value, or one of CLEAR_WORDS meaning "no limit" / "every model" / "never"."""

    def __init__(self, inner: Callable[[str], Any], name: str) -> None:
        self.inner = inner
        self.name = name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().lower() in CLEAR_WORDS:
            return None
        try:
            return self.inner(value.strip())
        except (ValueError, InvalidOperation) as exc:
            self.fail(f"{value!r} is not a valid {self.name}: {exc}", param, ctx)


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def usd(text: str) -> Decimal:
    amount = Decimal(text.removeprefix("$"))
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a non-negative amount")
    return amount


def model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("name at least one model, or 'all'")
    return names


_DURATION = re.compile(r"(\d+)([hdw])")


def expiry(text: str) -> datetime:
    """An ISO date or time (UTC unless it names a zone), or a duration from now: 12h, 30d, 2w."""
    if match := _DURATION.fullmatch(text):
        amount, unit = int(match[1]), match[2]
        hours = {"h": 1, "d": 24, "w": 24 * 7}[unit] * amount
        return datetime.now(UTC) + timedelta(hours=hours)
    return moment(text)


def moment(text: str) -> datetime:
    """An ISO date (its UTC midnight) or date-time (UTC unless it names a zone)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = datetime.combine(date.fromisoformat(text), time())
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


LIMIT = Clearable(positive_int, "limit (a whole number >= 1, or 'none')")
BUDGET = Clearable(usd, "budget in USD (or 'none')")
MODELS = Clearable(model_list, "comma-separated model list (or 'all')")
EXPIRY = Clearable(expiry, "expiry (ISO date/time, 30d, 12h, or 'never')")
