"""Settings: the embedded default's compute format and where the gateway keeps its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import EMBEDDED_GGUF_SHA256, ConfigError, Settings, load_settings


def test_the_embedded_default_serves_f16_checked_against_the_bundled_checksum() -> None:
    [model] = load_settings(environ={}).models
    assert model.backend == "llamacpp"
    assert model.options["compute_format"] == "f16"
    assert model.options["sha256"] == EMBEDDED_GGUF_SHA256


@pytest.mark.parametrize("fmt", ["stored", "f32", "q8_0"])
def test_the_embedded_compute_format_is_one_environment_variable(fmt: str) -> None:
    [model] = load_settings(environ={"LLAMA_GATEWAY_EMBEDDED_COMPUTE_FORMAT": fmt}).models
    assert model.options["compute_format"] == fmt


def test_an_unknown_embedded_compute_format_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="embedded_compute_format"):
        load_settings(environ={"LLAMA_GATEWAY_EMBEDDED_COMPUTE_FORMAT": "q2_k"})


def test_data_dir_defaults_to_the_users_data_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Settings().data_path() == tmp_path / "llama-gateway"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert Settings().data_path() == Path.home() / ".local" / "share" / "llama-gateway"
    assert Settings(data_dir="~/gw").weights_dir() == Path.home() / "gw" / "weights"
    assert load_settings(environ={"LLAMA_GATEWAY_DATA_DIR": str(tmp_path)}).weights_dir() == tmp_path / "weights"
