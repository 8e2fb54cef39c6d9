from __future__ import annotations

import pytest


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    """The limiter a test's gateway uses: None for the in-process one, the test Redis for the shared one."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_server")
        return url
    return None
