"""Model runtimes for the prediction unit tests: the Llama 2 tokenizer over a scripted backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from backends.scripted import ScriptedBackend
from gateway.serving.registry import ModelRuntime
from gateway.serving.tokenizers import load_tokenizer
from gateway.settings import ModelConfig
from tests.support.paths import LLAMA2_TOKENIZER_MODEL

TOKENIZER_MODEL = LLAMA2_TOKENIZER_MODEL


def _runtime(backend: Any = None, **changes: Any) -> ModelRuntime:
    config = ModelConfig(
        name="llama-2-chat",
        backend="scripted",
        template="llama-2",
        tokenizer=str(TOKENIZER_MODEL),
        aliases=["meta/llama-2-70b-chat"],
    )
    config = msgspec.structs.replace(config, **changes)
    chat_template = config.options.get("chat_template")
    return ModelRuntime(config, backend or ScriptedBackend(), load_tokenizer(config), chat_template)


@pytest.fixture(scope="session")
def make_runtime() -> Callable[..., ModelRuntime]:
    """A runtime for a Llama-2 chat model; keyword arguments change its ``ModelConfig``."""
    return _runtime


@pytest.fixture(scope="session")
def runtime() -> ModelRuntime:
    return _runtime()
