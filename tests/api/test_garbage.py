"""The serving process's garbage collector: startup's objects frozen, young passes rarer."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.api.garbage import OLDER_THRESHOLDS, YOUNG_THRESHOLD

_PROBE = """
import gc, json
from gateway.api.garbage import freeze_startup_objects
before = gc.get_freeze_count()
freeze_startup_objects()
print(json.dumps({"before": before, "after": gc.get_freeze_count(), "threshold": gc.get_threshold()}))
"""


def test_startup_objects_leave_the_collectors_sight() -> None:
    # In a process of its own: frozen objects are never collected, which a test process must not suffer.
    output = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout
    result = json.loads(output)
    assert result["after"] > result["before"] + 1000
    assert result["threshold"] == [YOUNG_THRESHOLD, *OLDER_THRESHOLDS]
