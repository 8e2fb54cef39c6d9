"""For the prediction unit tests: model runtimes (the Llama 2 tokenizer over a scripted backend), a
migrated database and a prediction service on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backends.scripted import ScriptedBackend
from gateway.api.replicate.records import PredictionRecords
from gateway.api.replicate.runner import PredictionService
from gateway.api.replicate.webhooks import WebhookSecrets
from gateway.serving.registry import ModelRuntime
from gateway.serving.tokenizers import load_tokenizer
from gateway.settings import ModelConfig
from tests.support.paths import LLAMA2_TOKENIZER_MODEL
from tests.support.prediction_records import prediction_database

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


@pytest.fixture
async def sessionmaker(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A migrated SQLite database with the keys ``key-a``, ``key-b`` and ``key-c``."""
    async with prediction_database(tmp_path) as made:
        yield made


@pytest.fixture
async def service(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[PredictionService]:
    """A prediction service on that database, its watcher running, without a webhook sender."""
    made = PredictionService(PredictionRecords(sessionmaker), WebhookSecrets(sessionmaker))
    made.open()
    try:
        yield made
    finally:
        await made.aclose()
