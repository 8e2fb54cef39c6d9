from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import MemoryLimiter
from gateway.errors import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_buckets_refill_continuously(make_key: Callable[..., ApiKeyInfo]) -> None:
    clock = Clock()
    limiter, key = MemoryLimiter(clock=clock), make_key(rpm=60, tpm=600)
    for _ in range(60):
        await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal(0))
    with pytest.raises(ApiError) as caught:
        await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal(0))
    assert caught.value.headers["Retry-After"] == "1"
    assert caught.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 1.0  # one request and ten tokens come back each second
    admission = await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal(0))
    assert admission.headers["x-ratelimit-remaining-requests"] == "0"
    assert admission.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 60
    admission = await limiter.admit(key, max_tokens=10, worst_case_cost=Decimal(0))
    assert admission.headers["x-ratelimit-remaining-requests"] == "59"  # capped at the limit
    assert admission.headers["x-ratelimit-reset-requests"] == "1s"


async def test_a_changed_limit_applies_to_the_next_request(make_key: Callable[..., ApiKeyInfo]) -> None:
    limiter, key = MemoryLimiter(), make_key(max_concurrency=1)
    held = await limiter.admit(key, max_tokens=1, worst_case_cost=Decimal(0))
    raised = ApiKeyInfo(**{**{f: getattr(key, f) for f in key.__struct_fields__}, "max_concurrency": 2})
    second = await limiter.admit(raised, max_tokens=1, worst_case_cost=Decimal(0))
    await held.settle(1, Decimal(0))
    await second.settle(1, Decimal(0))
