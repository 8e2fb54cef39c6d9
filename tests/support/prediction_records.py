"""A migrated SQLite database holding API keys, for the prediction and webhook unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.api.replicate.predictions import Prediction, new_prediction_id
from gateway.db import make_engine, make_sessionmaker, upgrade_database
from gateway.db.tables import ApiKey

KEY_IDS = ("key-a", "key-b", "key-c")


@asynccontextmanager
async def prediction_database(directory: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    url = f"sqlite:///{directory / 'predictions.db'}"
    await upgrade_database(url)
    engine = make_engine(url)
    sessionmaker = make_sessionmaker(engine)
    async with sessionmaker.begin() as session:
        for key_id in KEY_IDS:
            session.add(
                ApiKey(
                    id=key_id,
                    name=key_id,
                    owner=None,
                    metadata_={},
                    scope="user",
                    key_hash=hashlib.sha256(key_id.encode()).hexdigest(),
                    prefix=key_id,
                    allowed_models=None,
                    budget_period="total",
                    created_at=datetime.now(UTC),
                )
            )
    try:
        yield sessionmaker
    finally:
        await engine.dispose()


def new_prediction(owner: str = "key-a", **changes: Any) -> Prediction:
    """A prediction not yet stored, as a create request makes it."""
    fields: dict[str, Any] = {
        "id": new_prediction_id(),
        "owner": owner,
        "model": "meta/llama-2-70b-chat",
        "version": "llama-2-chat",
        "input": {"prompt": "Hi"},
        "base_url": "http://gateway.test",
    }
    return Prediction(**(fields | changes))
