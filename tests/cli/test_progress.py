"""The conversion progress ``serve`` draws: a bar on a terminal, nothing otherwise."""

from __future__ import annotations

import io
import os
import select
import sys

import pytest

from gateway.cli.progress import conversion_progress


def test_off_a_terminal_there_is_no_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with conversion_progress() as progress:
        assert progress is None


def _read_all(fd: int) -> bytes:
    """Everything written to the terminal so far: one read may return only its first part."""
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_on_a_terminal_a_bar_names_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = os.openpty()
    terminal = os.fdopen(follower, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("TERM", raising=False)
    try:
        with conversion_progress() as progress:
            assert progress is not None
            update = progress("smollm2-135m-instruct")
            for done in (0, 50, 100):
                update(done << 20, 100 << 20)
        terminal.flush()
        drawn = _read_all(leader).decode("utf-8", errors="replace")
    finally:
        terminal.close()
        os.close(leader)
    assert "smollm2-135m-instruct: converting weights (once)" in drawn
    assert "MB" in drawn
