"""Whether a process still runs, for tests of processes the gateway starts and stops."""

from __future__ import annotations

import os


def process_is_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True
