"""Fixtures of the llama.cpp backend tests: the bundled SmolLM2 and the tiny random Llama 2, served."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.tokenizers import GGUFTokenizer
from gateway.settings import embedded_model_path
from tests.backends.llamacpp.backend_support import config, embedded_config
from tests.support.embedded import shared_data_dir


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_data_dir(tmp_path_factory) / "weights"


@pytest.fixture(scope="module")
async def smollm(weights_dir: Path) -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(embedded_config(), weights_dir=weights_dir)
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
async def tiny(tiny_model_dir: Path) -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(config(tiny_model_dir / "model.gguf"))
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
def vocab() -> GGUFTokenizer:
    return GGUFTokenizer.from_file(embedded_model_path())
