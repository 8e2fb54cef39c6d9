"""What an API key is: its secret, its stored snapshot, and the fields a caller may set.

The plaintext (``sk-`` + 256 random bits) is shown once; only its sha256 and a short display
prefix are stored. Looking a key up by the hash of what the client sent needs no constant-time
comparison: the hash of a guess says nothing useful about any stored key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from gateway.accounting.usage.pricing import format_usd
from gateway.db.column_types import MONEY_QUANTUM

KEY_PREFIX = "sk-"
Scope = Literal["admin", "user"]
BudgetPeriod = Literal["total", "daily", "monthly"]

_PRESET_KEY = re.compile(r"sk-[A-Za-z0-9_\-]{16,200}")
# Bounds are the columns' (String(200), 32-bit INTEGER on PostgreSQL), so that a value the API
# accepts is one the database stores instead of failing the insert.
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_Owner = Annotated[str, msgspec.Meta(max_length=200)]
_Limit = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
_AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
_Models = Annotated[list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]], msgspec.Meta(max_length=1000)]
MAX_BUDGET_USD = Decimal(100_000_000)
"""Far above any real budget, and within what the money columns hold on SQLite and PostgreSQL."""


class InvalidKeyFields(ValueError):
    """A key's fields are out of range (the message names the field)."""


class KeyNotFound(LookupError):
    """No key has that id."""


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def display_prefix(plaintext: str) -> str:
    """Enough of the key for a person to tell keys apart, far too little to guess it."""
    return f"{plaintext[:7]}…{plaintext[-4:]}"


def check_preset_key(plaintext: str) -> None:
    """An operator-chosen key (the initial admin key) must still look like and be hard to guess."""
    if not _PRESET_KEY.fullmatch(plaintext):
        raise InvalidKeyFields("a preset key must be 'sk-' followed by at least 16 letters, digits, '-' or '_'")


class ApiKeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An immutable snapshot of a stored key, safe to cache and to show (it holds no secret)."""

    id: str
    name: str
    owner: str | None
    metadata: dict[str, Any]
    scope: Scope
    prefix: str
    allowed_models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    budget_usd: Decimal | None
    budget_period: BudgetPeriod
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def is_usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def status(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired``, as listings show it."""
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.is_usable(now) else "expired"

    @property
    def has_limits(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_concurrency, self.budget_usd))


class NewKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The fields of a key to create (also the body of ``POST /admin/keys``)."""

    name: _Name
    owner: _Owner | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    scope: Scope = "user"
    allowed_models: _Models | None = None
    rpm: _Limit | None = None
    tpm: _Limit | None = None
    max_concurrency: _Limit | None = None
    budget_usd: Decimal | None = None
    budget_period: BudgetPeriod = "total"
    expires_at: _AwareTime | None = None


class KeyUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Fields to change; a field left UNSET keeps its value, ``None`` clears a limit."""

    name: _Name | msgspec.UnsetType = msgspec.UNSET
    owner: _Owner | msgspec.UnsetType | None = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    scope: Scope | msgspec.UnsetType = msgspec.UNSET
    allowed_models: _Models | msgspec.UnsetType | None = msgspec.UNSET
    rpm: _Limit | msgspec.UnsetType | None = msgspec.UNSET
    tpm: _Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_concurrency: _Limit | msgspec.UnsetType | None = msgspec.UNSET
    budget_usd: Decimal | msgspec.UnsetType | None = msgspec.UNSET
    budget_period: BudgetPeriod | msgspec.UnsetType = msgspec.UNSET
    expires_at: _AwareTime | msgspec.UnsetType | None = msgspec.UNSET

    def changes(self) -> dict[str, Any]:
        return {
            field: value for field in self.__struct_fields__ if (value := getattr(self, field)) is not msgspec.UNSET
        }


def validated[T: (NewKey, KeyUpdate)](fields: T) -> T:
    """Apply the declared constraints to a struct built in Python (msgspec checks them only on decode)."""
    try:
        checked = msgspec.convert(msgspec.to_builtins(fields), type(fields))
    except msgspec.ValidationError as exc:
        raise InvalidKeyFields(str(exc)) from exc
    budget = getattr(checked, "budget_usd", None)
    if isinstance(budget, Decimal):
        # Checked in this order: quantizing an out-of-range amount raises instead of answering.
        if not budget.is_finite() or not 0 <= budget <= MAX_BUDGET_USD or budget != budget.quantize(MONEY_QUANTUM):
            raise InvalidKeyFields(
                f"budget_usd must be an amount from 0 to {MAX_BUDGET_USD} with at most 10 decimal places"
            )
        # Stored with ten places; the snapshot returned now should read as the one loaded later.
        checked.budget_usd = budget.quantize(MONEY_QUANTUM)
    expires_at = getattr(checked, "expires_at", None)
    if isinstance(expires_at, datetime):
        try:
            # Stored in UTC: a time whose UTC form falls outside years 1-9999 cannot be stored.
            checked.expires_at = expires_at.astimezone(UTC)
        except OverflowError:
            raise InvalidKeyFields("expires_at is out of range once converted to UTC") from None
    return checked


def key_fields(info: ApiKeyInfo) -> dict[str, Any]:
    """Every field of a key as JSON values, never its secret: what the admin API returns and the
    command line prints. Money is a decimal string, times are ISO 8601."""
    return {
        "id": info.id,
        "name": info.name,
        "prefix": info.prefix,
        "scope": info.scope,
        "status": info.status(datetime.now(UTC)),
        "owner": info.owner,
        "allowed_models": None if info.allowed_models is None else list(info.allowed_models),
        "rpm": info.rpm,
        "tpm": info.tpm,
        "max_concurrency": info.max_concurrency,
        "budget_usd": None if info.budget_usd is None else format_usd(info.budget_usd),
        "budget_period": info.budget_period,
        "expires_at": None if info.expires_at is None else info.expires_at.isoformat(),
        "revoked_at": None if info.revoked_at is None else info.revoked_at.isoformat(),
        "created_at": info.created_at.isoformat(),
        "metadata": info.metadata,
    }
