from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.accounting.usage import cost, format_usd, worst_case_cost


@pytest.mark.parametrize(
    ("tokens", "per_million", "expected"),
    [
        (1, Decimal("0.65"), Decimal("0.0000006500")),
        (1_000_000, Decimal("2.75"), Decimal("2.7500000000")),
        (333, Decimal("0.65"), Decimal("0.0002164500")),
        (0, Decimal("2.75"), Decimal("0E-10")),
        (7, Decimal("0.000000001"), Decimal("0E-10")),  # below a ten-billionth of a dollar
    ],
)
def test_cost_is_exact_to_ten_places(tokens: int, per_million: Decimal, expected: Decimal) -> None:
    assert cost(tokens, per_million) == expected
    assert cost(tokens, per_million).as_tuple().exponent == -10


def test_costs_add_up_exactly() -> None:
    total = sum((cost(1, Decimal("0.1")) for _ in range(10_000)), Decimal(0))
    assert total == Decimal("0.001")


def test_worst_case_never_falls_below_the_settled_cost() -> None:
    # Each part is 1.5e-10 USD: rounded half-even each settles at 2e-10, 4e-10 in all.
    price = Decimal("0.00015")
    reserved = worst_case_cost(1, 1, price, price)
    assert cost(1, price) + cost(1, price) == Decimal("4E-10")
    assert reserved >= cost(1, price) + cost(1, price)
    with pytest.raises(ValueError, match=">= 0"):
        cost(-1, Decimal(1))


@pytest.mark.parametrize(
    ("amount", "text"),
    [(Decimal("5"), "5.00"), (Decimal("0.0027500000"), "0.00275"), (Decimal("12.3"), "12.30")],
)
def test_format_usd(amount: Decimal, text: str) -> None:
    assert format_usd(amount) == text
