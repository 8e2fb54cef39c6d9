"""Predictions shared by every replica, webhook signing secrets and the webhook outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from gateway.db.column_types import UtcDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("seq", SERIAL, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("version", sa.String(200), nullable=False),
        sa.Column("input", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("webhook", sa.Text(), nullable=True),
        sa.Column("webhook_events", sa.JSON(), nullable=False),
        sa.Column("runner", sa.String(64), nullable=False),
        sa.Column("heartbeat_at", UtcDateTime(), nullable=False),
        sa.Column("cancel_requested_at", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("started_at", UtcDateTime(), nullable=True),
        sa.Column("completed_at", UtcDateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('starting', 'processing', 'succeeded', 'failed', 'canceled')",
            name=op.f("ck_predictions_status"),
        ),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_predictions_key_id_api_keys")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_predictions")),
        sa.UniqueConstraint("id", name=op.f("uq_predictions_id")),
    )
    op.create_index("ix_predictions_key_id_seq", "predictions", ["key_id", "seq"])
    op.create_index("ix_predictions_status_heartbeat_at", "predictions", ["status", "heartbeat_at"])
    op.create_index("ix_predictions_completed_at", "predictions", ["completed_at"])
    op.create_table(
        "webhook_secrets",
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("secret", sa.String(80), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_webhook_secrets_key_id_api_keys")),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_webhook_secrets")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("seq", SERIAL, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("prediction_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UtcDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("delivered_at", UtcDateTime(), nullable=True),
        sa.Column("abandoned_at", UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_webhook_deliveries_key_id_api_keys")),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("id", name=op.f("uq_webhook_deliveries_id")),
    )
    op.create_index(
        "ix_webhook_deliveries_pending", "webhook_deliveries", ["delivered_at", "abandoned_at", "next_attempt_at"]
    )
    op.create_index("ix_webhook_deliveries_prediction_id_seq", "webhook_deliveries", ["prediction_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_prediction_id_seq", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_pending", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_secrets")
    op.drop_index("ix_predictions_completed_at", table_name="predictions")
    op.drop_index("ix_predictions_status_heartbeat_at", table_name="predictions")
    op.drop_index("ix_predictions_key_id_seq", table_name="predictions")
    op.drop_table("predictions")
