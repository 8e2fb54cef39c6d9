"""Usage accounting: prices, the group-commit recorder, and reports."""

from gateway.accounting.usage.entry import UsageEntry, UsageStatus
from gateway.accounting.usage.groupings import BUCKETS, GROUPINGS, Bucket, GroupBy
from gateway.accounting.usage.pricing import cost, format_usd, worst_case_cost
from gateway.accounting.usage.recorder import RecorderClosed, UsageNotRecorded, UsageRecorder
from gateway.accounting.usage.report import UsageReport, UsageTotals, spend_by_key, spend_since, usage_report

__all__ = [
    "BUCKETS",
    "GROUPINGS",
    "Bucket",
    "GroupBy",
    "RecorderClosed",
    "UsageEntry",
    "UsageNotRecorded",
    "UsageRecorder",
    "UsageReport",
    "UsageStatus",
    "UsageTotals",
    "cost",
    "format_usd",
    "spend_by_key",
    "spend_since",
    "usage_report",
    "worst_case_cost",
]
