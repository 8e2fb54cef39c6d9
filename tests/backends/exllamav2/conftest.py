"""Fixtures of the exllamav2 tests: the Llama 2 tokenizer, a model directory, and the fake engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from backends.exllamav2 import engine
from tests.backends.exllamav2.fake_engine import FakeGenerator, fake_engine, write_model_dir


@pytest.fixture(scope="module")
def hf_tokenizer(llama2_tokenizer_dir: Path) -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(llama2_tokenizer_dir / "tokenizer.json"))


@pytest.fixture
def model_dir(tmp_path: Path, llama2_tokenizer_dir: Path) -> Path:
    return write_model_dir(tmp_path / "model", llama2_tokenizer_dir)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    recorded: list[tuple[Any, ...]] = []
    monkeypatch.setattr(engine, "import_engine", lambda name: fake_engine(recorded))
    FakeGenerator.instances.clear()
    return recorded
