"""What every limiter shares: the protocol, the admission handle, budget periods, 429 errors.

A request is admitted once, before it reaches a backend, and settled once, in a ``finally``,
with what it really used. Admission takes one request from the RPM bucket, the worst-case token
count (prompt + max completion tokens) from the TPM bucket, a concurrency slot, and reserves the
worst-case cost against the budget; settling refunds unused tokens, frees the slot, and turns the
reservation into the real cost. Concurrent requests therefore cannot spend past a budget.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from gateway.accounting.keys import ApiKeyInfo, BudgetPeriod
from gateway.accounting.usage.pricing import format_usd
from gateway.errors import ApiError

SpendLoader = Callable[[str, datetime | None], Awaitable[Decimal]]
"""``(key_id, period_start) -> USD spent since then`` (None: ever), read from the usage table."""
Release = Callable[[int, Decimal], Awaitable[None]]


class Admission:
    """An admitted request's hold on its key's limits."""

    def __init__(self, headers: Mapping[str, str] | None = None, release: Release | None = None) -> None:
        self.headers: dict[str, str] = dict(headers or {})
        """``x-ratelimit-*`` headers for the response."""
        self._release = release
        self._settled = False

    async def settle(self, actual_tokens: int, actual_cost: Decimal) -> None:
        """Report what the request used and free its slot. Only the first call counts."""
        if self._settled:
            return
        self._settled = True
        if self._release is not None:
            # Runs in a ``finally`` of a request that may be cancelled again while settling.
            await asyncio.shield(self._release(actual_tokens, actual_cost))


class Limiter(Protocol):
    async def admit(self, key: ApiKeyInfo, *, max_tokens: int, worst_case_cost: Decimal) -> Admission:
        """Admit a request that may use ``max_tokens`` tokens (prompt + completion) and cost up to
        ``worst_case_cost``, or raise a 429 ``ApiError``."""
        ...

    async def problem(self) -> str | None:
        """None when the limiter can admit requests, else why not (readiness)."""
        ...

    async def aclose(self) -> None: ...


def period_start(period: BudgetPeriod, now: datetime) -> datetime | None:
    """Start of the budget period holding ``now`` (UTC days and months); None for "total"."""
    now = now.astimezone(UTC)
    if period == "daily":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "monthly":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def rate_headers(rpm: int | None, requests_left: float, tpm: int | None, tokens_left: float) -> dict[str, str]:
    """Headers for buckets that refill continuously and are full again after one minute."""
    headers: dict[str, str] = {}
    if rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, math.floor(requests_left)))
        headers["x-ratelimit-reset-requests"] = format_reset((rpm - requests_left) * 60 / rpm)
    if tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(tokens_left)))
        headers["x-ratelimit-reset-tokens"] = format_reset((tpm - tokens_left) * 60 / tpm)
    return headers


def _retry(seconds: float, headers: Mapping[str, str]) -> dict[str, str]:
    return {
        **headers,
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def requests_exceeded(key: ApiKeyInfo, retry_after: float, headers: Mapping[str, str]) -> ApiError:
    return ApiError(
        429,
        f"Rate limit reached for requests per min (RPM) on key {key.prefix}: Limit {key.rpm}. "
        f"Please try again in {format_reset(retry_after)}.",
        type="requests",
        code="rate_limit_exceeded",
        headers=_retry(retry_after, headers),
    )


def tokens_exceeded(key: ApiKeyInfo, requested: int, retry_after: float, headers: Mapping[str, str]) -> ApiError:
    if key.tpm is not None and requested > key.tpm:
        return ApiError(
            429,
            f"Request too large for tokens per min (TPM) on key {key.prefix}: Limit {key.tpm}, "
            f"Requested {requested}. Reduce the prompt or max_tokens.",
            type="tokens",
            code="rate_limit_exceeded",
            headers={**headers, "x-should-retry": "false"},
        )
    return ApiError(
        429,
        f"Rate limit reached for tokens per min (TPM) on key {key.prefix}: Limit {key.tpm}, "
        f"Requested {requested}. Please try again in {format_reset(retry_after)}.",
        type="tokens",
        code="rate_limit_exceeded",
        headers=_retry(retry_after, headers),
    )


def concurrency_exceeded(key: ApiKeyInfo) -> ApiError:
    return ApiError(
        429,
        f"Too many concurrent requests on key {key.prefix}: Limit {key.max_concurrency}. "
        "Please retry when one of them has finished.",
        type="requests",
        code="rate_limit_exceeded",
        headers=_retry(1, {}),
    )


def budget_held(key: ApiKeyInfo) -> ApiError:
    """The budget would cover the request once requests in flight settle below their worst case."""
    return ApiError(
        429,
        f"The budget of key {key.prefix} is reserved by requests in flight. Please try again shortly.",
        type="requests",
        code="rate_limit_exceeded",
        headers=_retry(1, {}),
    )


def budget_exhausted(key: ApiKeyInfo) -> ApiError:
    period = {"total": "", "daily": " per day", "monthly": " per month"}[key.budget_period]
    budget = format_usd(key.budget_usd or Decimal(0))
    return ApiError(
        429,
        f"You exceeded your current quota: key {key.prefix} has a budget of ${budget}{period}, "
        "and this request could cost more than is left of it.",
        type="insufficient_quota",
        code="insufficient_quota",
        # Retrying cannot help until the period ends or the budget is raised; tell SDKs not to.
        headers={"x-should-retry": "false"},
    )
