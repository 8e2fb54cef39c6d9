from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.databases import POSTGRES_URL, REDIS_URL, PostgresServer, service_unavailable
from tests.support.embedded import direct_engine
from tests.support.paths import LLAMA2_REFERENCE, LLAMA2_TOKENIZER_DIR

__all__ = ["direct_engine"]  # a fixture shared by the API and backend tests


def _reference_tokenizations() -> list[tuple[str, list[int]]]:
    # Bytes, not text mode: some inputs hold "\r", which universal newlines would rewrite.
    inputs = (LLAMA2_REFERENCE / "reference.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (LLAMA2_REFERENCE / "reference.out").read_bytes().decode("utf-8").split("\n")
    # Both files end with a separator, which leaves one empty entry behind.
    assert inputs[-1] == ""
    assert outputs[-1] == ""
    assert len(inputs) == len(outputs)
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs[:-1], outputs[:-1], strict=True)]


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    """The Llama 2 tokenizer the package ships: tokenizer.model and tokenizer.json."""
    return LLAMA2_TOKENIZER_DIR


@pytest.fixture(scope="session")
def llama2_reference_dir() -> Path:
    """llama.cpp's Llama 2 vocabulary (vocab-llama-spm.gguf) and reference tokenizations."""
    return LLAMA2_REFERENCE


@pytest.fixture(scope="session")
def reference_tokenizations() -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenizations of the Llama 2 vocabulary: (text, ids without BOS)."""
    return _reference_tokenizations()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama 2 in both formats (model.gguf, safetensors + config.json)."""
    from gateway.devtools.tiny_model import write_tiny_model

    out = tmp_path_factory.mktemp("tiny-llama-2")
    write_tiny_model(out, size="tiny", seed=0)
    return out


# Every database test runs on SQLite and on PostgreSQL; Redis backs the shared limits.


@pytest.fixture(scope="session")
async def postgres_server() -> AsyncIterator[PostgresServer]:
    import asyncpg

    server = PostgresServer(POSTGRES_URL)
    try:
        await server.execute("SELECT 1")
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        service_unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    yield server
    await server.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_server(request: pytest.FixtureRequest) -> PostgresServer | None:
    """The PostgreSQL server for the postgres run of a test, None for the SQLite run."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server
    return None


async def _database(server: PostgresServer | None, tmp_path: Path, *, migrated: bool) -> str:
    if server is not None:
        return await server.create(migrated=migrated)
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    if migrated:
        from gateway.db import upgrade_database

        await upgrade_database(url)
    return url


@pytest.fixture
async def db_url(db_server: PostgresServer | None, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database (no tables)."""
    url = await _database(db_server, tmp_path, migrated=False)
    yield url
    if db_server is not None:
        await db_server.drop(url)


@pytest.fixture
async def db_url_migrated(db_server: PostgresServer | None, tmp_path: Path) -> AsyncIterator[str]:
    """A database migrated to head, with no rows."""
    url = await _database(db_server, tmp_path, migrated=True)
    yield url
    if db_server is not None:
        await db_server.drop(url)


@pytest.fixture
async def db_sessionmaker(db_url_migrated: str) -> AsyncIterator[object]:
    """``async_sessionmaker`` on a migrated database."""
    from gateway.db import make_engine, make_sessionmaker

    engine = make_engine(db_url_migrated)
    yield make_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(scope="session")
async def redis_server() -> str:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, RedisError) as exc:
        service_unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
async def redis_prefix(redis_server: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys (and no others) are deleted afterwards."""
    from redis.asyncio import Redis

    prefix = f"llama-gateway-test:{uuid.uuid4().hex}"
    yield prefix
    client = Redis.from_url(redis_server)
    try:
        async for name in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(name)
    finally:
        await client.aclose()
