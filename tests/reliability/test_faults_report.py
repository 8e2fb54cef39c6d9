"""The faults report as JSON: every scenario's counters, whatever they are keyed by."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from bench.faults.report import ScenarioResult, as_json


@dataclass
class _KeyedResult(ScenarioResult):
    statuses: Counter[int] = field(default_factory=Counter)
    refusals: dict[tuple[int, str], int] = field(default_factory=dict)


def test_counters_keyed_by_numbers_and_pairs_become_json_objects() -> None:
    result = _KeyedResult("storm", 3, 2, 1, 2, 2, statuses=Counter({200: 2, 429: 1}), refusals={(429, "rate_limit"): 1})
    [written] = json.loads(as_json([result]))
    assert written["statuses"] == {"200": 2, "429": 1}
    assert written["refusals"] == {"429 rate_limit": 1}
    assert written["ok"] is True
