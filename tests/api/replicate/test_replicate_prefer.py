from __future__ import annotations

import pytest

from gateway.api.replicate.routes import prefer_wait


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("respond-async", None),
        ("wait", 60),
        ("Wait", 60),
        ("wait=5", 5),
        ("wait=0", 1),
        ("wait=600", 60),
        ("wait=soon", 60),
        ("respond-async, wait=10", 10),
        ("wait=7; foo=bar", 7),
    ],
)
def test_prefer_wait(header: str | None, seconds: int | None) -> None:
    assert prefer_wait(header) == seconds
