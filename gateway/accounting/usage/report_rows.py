"""A usage report as flat rows and as CSV: what ``llama-gateway usage report`` prints and what
``GET /admin/usage?format=csv`` and ``GET /v1/usage?format=csv`` answer, byte for byte.

Columns: ``bucket`` (bucketed reports only), the grouping (``key`` with the key's ``name``,
``model``, ``status``, ``day`` or ``hour``), ``requests``, ``prompt_tokens``,
``completion_tokens``, ``input_usd``, ``output_usd``, ``total_usd``. Amounts are written as
people read them (at least cents, every further digit that is not zero; ``format_usd``). The last
row is the total, its grouping column ``total``, so that spreadsheets and eyes find it alike.
Lines end in CRLF, as RFC 4180 and Python's ``csv`` module write them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.accounting.usage.pricing import format_usd
from gateway.accounting.usage.report import UsageReport, UsageTotals

CSV_MEDIA_TYPE = "text/csv"
"""Served as ``text/csv; charset=utf-8`` (Litestar adds the charset to text types)."""


def totals_row(totals: UsageTotals, report: UsageReport, *, for_table: bool = False) -> dict[str, object]:
    """One row; ``for_table`` names the columns for a terminal table instead of for machines."""
    group_by = report.group_by
    amounts = (totals.input_cost, totals.output_cost, totals.total_cost)
    names = ("input $", "output $", "total $") if for_table else ("input_usd", "output_usd", "total_usd")
    return {
        **({"bucket": totals.bucket} if report.bucket is not None else {}),
        group_by: totals.group,
        **({"name": totals.label} if group_by == "key" else {}),
        "requests": totals.requests,
        ("prompt" if for_table else "prompt_tokens"): totals.prompt_tokens,
        ("completion" if for_table else "completion_tokens"): totals.completion_tokens,
        **{name: format_usd(amount) for name, amount in zip(names, amounts, strict=True)},
    }


def report_rows(report: UsageReport, *, for_table: bool = False) -> list[dict[str, object]]:
    """The report's rows, then its total as a row of its own."""
    rows = [totals_row(totals, report, for_table=for_table) for totals in report.rows]
    return [*rows, totals_row(report.total, report, for_table=for_table)]


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV with a header line (the first row's keys); nothing at all for no rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def report_csv(report: UsageReport) -> str:
    return csv_text(report_rows(report))
