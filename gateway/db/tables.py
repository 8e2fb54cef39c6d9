"""Tables: API keys, one usage row per admitted request, and Replicate-style predictions with
the webhook deliveries they owe.

Keys are never deleted, only revoked, so every usage row keeps a valid ``key_id``. A usage row
keeps the prices it was charged at: changing a model's price later does not rewrite history.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gateway.db.column_types import Money, UtcDateTime

# Named constraints let later migrations alter them identically on SQLite (batch mode) and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SCOPES = ("admin", "user")
BUDGET_PERIODS = ("total", "daily", "monthly")
USAGE_STATUSES = ("completed", "length", "stopped", "cancelled", "failed")
PREDICTION_STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(_one_of("scope", SCOPES), name="scope"),
        CheckConstraint(_one_of("budget_period", BUDGET_PERIODS), name="budget_period"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    scope: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 hex of the plaintext key; the plaintext is shown once and never stored."""
    prefix: Mapped[str] = mapped_column(String(32))
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)
    """None: every model."""
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    budget_period: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


# SQLite only auto-increments an INTEGER PRIMARY KEY.
SERIAL = BigInteger().with_variant(Integer, "sqlite")


class UsageRecord(Base):
    __tablename__ = "usage_records"
    __table_args__ = (
        CheckConstraint(_one_of("status", USAGE_STATUSES), name="status"),
        Index("ix_usage_records_key_id_started_at", "key_id", "started_at"),
        Index("ix_usage_records_model_started_at", "model", "started_at"),
    )

    id: Mapped[int] = mapped_column(SERIAL, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(64))
    user: Mapped[str | None] = mapped_column(String(256))
    """The end user the client named in the request's ``user`` field."""
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    input_price_per_million: Mapped[Decimal] = mapped_column(Money)
    output_price_per_million: Mapped[Decimal] = mapped_column(Money)
    input_cost: Mapped[Decimal] = mapped_column(Money)
    output_cost: Mapped[Decimal] = mapped_column(Money)
    status: Mapped[str] = mapped_column(String(16))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime] = mapped_column(UtcDateTime)


class PredictionRecord(Base):
    """A prediction as every replica sees it. The replica running it (``runner``) writes its
    progress; any replica reads it, and asks for a cancel by setting ``cancel_requested_at``."""

    __tablename__ = "predictions"
    __table_args__ = (
        CheckConstraint(_one_of("status", PREDICTION_STATUSES), name="status"),
        Index("ix_predictions_key_id_seq", "key_id", "seq"),
        Index("ix_predictions_status_heartbeat_at", "status", "heartbeat_at"),
        Index("ix_predictions_completed_at", "completed_at"),
    )

    seq: Mapped[int] = mapped_column(SERIAL, primary_key=True)
    """Creation order: list pages and their cursors follow it."""
    id: Mapped[str] = mapped_column(String(32), unique=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[list[str]] = mapped_column(JSON)
    """The output pieces written so far (at most a moment behind the runner's own view)."""
    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_url: Mapped[str] = mapped_column(Text)
    """The gateway's address as the creating client saw it: the ``urls`` every replica shows."""
    webhook: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str]] = mapped_column(JSON)
    runner: Mapped[str] = mapped_column(String(64))
    """The replica running it (a per-process id)."""
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime)
    """Renewed by the runner while it runs: a stale one means the runner is gone."""
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class WebhookSecret(Base):
    """The signing secret of one API key's webhooks (``GET /v1/webhooks/default/secret``)."""

    __tablename__ = "webhook_secrets"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(80))
    """``whsec_`` and the base64 of 32 random bytes."""
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WebhookDelivery(Base):
    """One webhook request owed (an outbox row): written with the prediction state it reports, sent
    and retried by whichever replica claims it, in order per prediction."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_pending", "delivered_at", "abandoned_at", "next_attempt_at"),
        Index("ix_webhook_deliveries_prediction_id_seq", "prediction_id", "seq"),
    )

    seq: Mapped[int] = mapped_column(SERIAL, primary_key=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    """The ``webhook-id`` header: the same on every retry, so receivers can drop duplicates."""
    prediction_id: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    event: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    """The prediction's JSON at the event, exactly the bytes sent and signed."""
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    abandoned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
