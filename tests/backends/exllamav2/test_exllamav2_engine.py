"""What the machine has for exllamav2: flash-attn's version, the model directory, and importing
torch and exllamav2, each failure in one sentence."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from backends.base import BackendUnavailable
from backends.config import BackendConfig
from backends.exllamav2 import engine
from tests.backends.exllamav2.fake_engine import assert_one_sentence, write_model_dir


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.5.7", True), ("2.8.3+cu130torch2.11", True), ("2.5.6", False), ("2.4.2", False)],
)
def test_paged_attention_needs_flash_attn_2_5_7(monkeypatch: pytest.MonkeyPatch, version: str, expected: bool) -> None:
    monkeypatch.delenv("EXLLAMA_NO_FLASH_ATTN", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    assert engine.paged_attention_available() is expected
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")
    assert engine.paged_attention_available() is False


def test_model_dir_checks(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    missing = BackendConfig(name="llama-2-70b-chat", path=str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailable, match="is not a model directory") as caught:
        engine.check_model_dir(missing)
    assert_one_sentence(caught.value)
    (tmp_path / "empty").mkdir()
    empty = BackendConfig(name="llama-2-70b-chat", path=str(tmp_path / "empty"))
    with pytest.raises(BackendUnavailable, match=r"has no config\.json"):
        engine.check_model_dir(empty)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BackendUnavailable, match=r"has no tokenizer\.json"):
        engine.check_model_dir(empty)
    model_dir = write_model_dir(tmp_path / "ok", llama2_tokenizer_dir)
    ok = BackendConfig(name="llama-2-70b-chat", path=str(model_dir))
    assert engine.check_model_dir(ok) == model_dir


def fake_torch(*, cuda: str | None, gpus: int) -> ModuleType:
    torch = ModuleType("torch")
    torch.__version__ = "2.11.0"  # type: ignore[attr-defined]
    torch.version = SimpleNamespace(cuda=cuda)  # type: ignore[attr-defined]
    torch.cuda = SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)  # type: ignore[attr-defined]
    return torch


@pytest.mark.parametrize(
    ("installed", "torch", "words"),
    [
        (
            {"torch"},
            None,
            "needs the exllamav2 package, which is not installed (pip install 'llama-gateway[gpu]')",
        ),
        ({"exllamav2"}, None, "needs PyTorch with CUDA, which is not installed"),
        ({"exllamav2", "torch"}, fake_torch(cuda=None, gpus=0), "but PyTorch 2.11.0 has none"),
        ({"exllamav2", "torch"}, fake_torch(cuda="13.0", gpus=0), "needs an NVIDIA GPU, and none is visible"),
        (
            {"exllamav2", "torch"},
            fake_torch(cuda="13.0", gpus=1),
            "could not import exllamav2: RuntimeError: nvcc",
        ),
    ],
)
def test_import_failures_are_one_sentence(
    monkeypatch: pytest.MonkeyPatch, installed: set[str], torch: ModuleType | None, words: str
) -> None:
    def find_spec(name: str) -> object:
        return object() if name in installed else None

    def import_module(name: str) -> ModuleType:
        if name == "torch" and torch is not None:
            return torch
        raise RuntimeError("nvcc failed while building exllamav2_ext\nlong compiler log")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(BackendUnavailable) as caught:
        engine.import_engine("llama-2-70b-chat")
    assert words in str(caught.value)
    assert_one_sentence(caught.value)
