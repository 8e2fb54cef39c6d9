"""Without Chromium the browser tests fail under CI and are skipped, with the reason, elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import browser


@pytest.fixture
def no_chromium(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(browser.shutil, "which", lambda _: None)


@pytest.mark.usefixtures("no_chromium")
@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_missing_chromium_fails(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        browser.chromium_executable()


@pytest.mark.usefixtures("no_chromium")
@pytest.mark.parametrize("ci", [None, "false"])
def test_elsewhere_a_missing_chromium_skips(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="need Chromium"):
        browser.chromium_executable()
