from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.accounting.limits import format_reset, period_start


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (0, "0ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9994, "59.999s"),
        (360, "6m0s"),
        (61.25, "1m1.25s"),
    ],
)
def test_reset_durations_read_like_openai_headers(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_budget_periods_start_at_utc_midnight_and_month_start() -> None:
    now = datetime(2025, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=5)))  # 2025-02-28 20:30 UTC
    assert period_start("daily", now) == datetime(2025, 2, 28, tzinfo=UTC)
    assert period_start("monthly", now) == datetime(2025, 2, 1, tzinfo=UTC)
    assert period_start("total", now) is None
