"""Keys and usage entries built in Python, for tests of the limiter, the recorder and the spool."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.usage import UsageEntry


def key_info(**limits: Any) -> ApiKeyInfo:
    """A user key with no limits except ``limits`` (rpm, tpm, max_concurrency, budget_usd, ...)."""
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "name": "limited",
        "owner": None,
        "metadata": {},
        "scope": "user",
        "prefix": "sk-test…abcd",
        "allowed_models": None,
        "rpm": None,
        "tpm": None,
        "max_concurrency": None,
        "budget_usd": None,
        "budget_period": "total",
        "expires_at": None,
        "revoked_at": None,
        "created_at": datetime.now(UTC),
    }
    return ApiKeyInfo(**(fields | limits))


def usage_entry(key_id: str = "key", *, started: datetime | None = None, **changes: object) -> UsageEntry:
    """A completed chat completion's entry at the hosted Llama-2-70B-chat prices."""
    started = started or datetime.now(UTC)
    fields: dict[str, object] = {
        "request_id": f"req_{uuid.uuid4().hex}",
        "key_id": key_id,
        "model": "llama-2-70b-chat",
        "endpoint": "/v1/chat/completions",
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "input_price_per_million": Decimal("0.65"),
        "output_price_per_million": Decimal("2.75"),
        "status": "completed",
        "finish_reason": "stop",
        "ttft_ms": 40,
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=250),
    }
    return UsageEntry(**(fields | changes))  # type: ignore[arg-type]
