"""One row per fault scenario: what was sent, what was served, what failed, which rows exist."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ScenarioResult:
    name: str
    sent: int
    """Requests the clients sent."""
    served: int
    """Requests answered with a 2xx (for streams: the 200 was sent)."""
    failed: int
    """Requests answered with an error status, or cut off."""
    usage_rows: int
    """Usage rows found in the database afterwards."""
    expected_rows: int
    """Usage rows there must be (one per admitted request)."""
    server_errors: int = 0
    """Responses with a 5xx status other than 503 (never acceptable)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.usage_rows == self.expected_rows and self.server_errors == 0


def table(results: list[ScenarioResult]) -> str:
    header = ("scenario", "sent", "served", "failed", "usage rows", "expected", "5xx", "ok")
    rows = [
        (r.name, r.sent, r.served, r.failed, r.usage_rows, r.expected_rows, r.server_errors, "yes" if r.ok else "NO")
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for result in results:
        lines.extend(f"  {result.name}: {note}" for note in result.notes)
    return "\n".join(lines)


def as_json(results: list[ScenarioResult]) -> str:
    # Not ``dataclasses.asdict``: it rebuilds a Counter from (key, count) pairs, counting the pairs.
    rows = [{f.name: getattr(r, f.name) for f in fields(r)} | {"ok": r.ok} for r in results]
    return json.dumps(_json_ready(rows), indent=2)


def _json_ready(value: Any) -> Any:
    """Counters keyed by statuses or by (status, code) pairs get string keys, as JSON needs."""
    if isinstance(value, dict):
        return {
            k if isinstance(k, str) else " ".join(map(str, k)) if isinstance(k, tuple) else str(k): _json_ready(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value
