"""A real Chromium for the dashboard's browser tests, driven by Playwright.

Playwright's own browser downloads are not used: the tests drive the system's Chromium (Debian's
``chromium`` package, ``/usr/bin/chromium``; ``.ci/run`` installs it). Where it is missing the
tests fail under ``CI`` and are skipped, with the reason, on a workstation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def chromium_executable() -> Path:
    """The Chromium to drive; fails (CI) or skips (elsewhere) when there is none."""
    if CHROMIUM.is_file():
        return CHROMIUM
    found = shutil.which("chromium")
    if found is not None:
        return Path(found)
    reason = f"the dashboard's browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
