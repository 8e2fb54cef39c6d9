from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import Limiter, MemoryLimiter, RedisLimiter
from tests.support.accounting_records import key_info as _key

MakeLimiter = Callable[..., Limiter]


@pytest.fixture
def make_key() -> Callable[..., ApiKeyInfo]:
    """Builds a key snapshot with the given limits and an id of its own."""
    return _key


class LimiterKind:
    def __init__(self, kind: str, redis_url: str = "", prefix: str = "") -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefix = prefix


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limiter_kind(request: pytest.FixtureRequest) -> LimiterKind:
    """The limiter's kind; for Redis, the server and a key prefix of this test's own."""
    if request.param == "redis":
        return LimiterKind("redis", request.getfixturevalue("redis_server"), request.getfixturevalue("redis_prefix"))
    return LimiterKind("memory")


@pytest.fixture
def limiter_kind_name(limiter_kind: LimiterKind) -> str:
    return limiter_kind.kind


@pytest.fixture
async def make_limiter(limiter_kind: LimiterKind) -> AsyncIterator[MakeLimiter]:
    """Builds limiters of this test's kind; Redis ones share state, like replicas do."""
    made: list[Limiter] = []

    def build(spend_loader: Any = None, **options: Any) -> Limiter:
        limiter: Limiter
        if limiter_kind.kind == "redis":
            limiter = RedisLimiter.from_url(limiter_kind.redis_url, spend_loader, prefix=limiter_kind.prefix, **options)
        else:
            limiter = MemoryLimiter(spend_loader, **options)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()
