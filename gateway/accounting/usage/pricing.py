"""Token prices to money. Exact decimal arithmetic throughout; floats never touch an amount."""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

from gateway.db.column_types import MONEY_QUANTUM


def cost(tokens: int, per_million: Decimal) -> Decimal:
    """USD for ``tokens`` at ``per_million`` USD per 1M tokens, to ten decimal places."""
    if tokens < 0:
        raise ValueError(f"token count must be >= 0, not {tokens}")
    # scaleb shifts the exponent: exact, unlike dividing by a million.
    return (Decimal(tokens) * per_million).scaleb(-6).quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)


def worst_case_cost(
    prompt_tokens: int, max_completion_tokens: int, input_per_million: Decimal, output_per_million: Decimal
) -> Decimal:
    """The most a request can cost: the budget reservation made at admission."""

    def ceiling(tokens: int, per_million: Decimal) -> Decimal:
        # Each part rounded up: never below ``cost`` of that part, however ``cost`` rounds.
        return (Decimal(tokens) * per_million).scaleb(-6).quantize(MONEY_QUANTUM, rounding=ROUND_CEILING)

    return ceiling(prompt_tokens, input_per_million) + ceiling(max_completion_tokens, output_per_million)


def format_usd(amount: Decimal) -> str:
    """An amount for people: at least cents, and every further digit that is not zero."""
    cents = amount.quantize(Decimal("0.01"))
    return f"{cents if cents == amount else amount.normalize():f}"
