from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.accounting.keys import (
    InvalidKeyFields,
    KeyNotFound,
    KeyStore,
    KeyUpdate,
    NewKey,
    display_prefix,
    generate_key,
    hash_key,
)
from gateway.db.tables import ApiKey

Sessions = async_sessionmaker[AsyncSession]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_generated_keys_carry_256_random_bits() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("sk-")
        assert len(key) == 3 + 43  # token_urlsafe(32): 32 bytes in unpadded base64
    assert display_prefix("sk-abcdefghijklmnopwxyz") == "sk-abcd…wxyz"


async def test_plaintext_is_never_stored(db_sessionmaker: Sessions, db_url_migrated: str) -> None:
    store = KeyStore(db_sessionmaker)
    info, plaintext = await store.create(NewKey(name="ci", owner="team-a"))
    async with db_sessionmaker() as session:
        row = (await session.execute(text("SELECT * FROM api_keys"))).one()
    stored = " ".join(str(value) for value in row)
    assert plaintext not in stored
    assert plaintext[3:] not in stored
    assert hash_key(plaintext) in stored
    assert info.prefix in stored
    if db_url_migrated.startswith("sqlite"):
        # Not in the file either (nor its write-ahead log), e.g. as a leftover of a temporary value.
        database = Path(db_url_migrated.split("///", 1)[1])
        for path in database.parent.glob(database.name + "*"):
            assert plaintext.encode() not in path.read_bytes()


async def test_authenticate_accepts_only_live_keys(db_sessionmaker: Sessions) -> None:
    store = KeyStore(db_sessionmaker)
    info, plaintext = await store.create(NewKey(name="app", rpm=5, allowed_models=["llama-2"]))
    found = await store.authenticate(plaintext)
    assert found == info
    assert found is not None
    assert found.allows_model("llama-2")
    assert not found.allows_model("other")
    assert await store.authenticate(plaintext + "x") is None
    assert await store.authenticate("not-a-key") is None
    assert await store.authenticate("") is None

    past = datetime.now(UTC) - timedelta(seconds=1)
    _, expired = await store.create(NewKey(name="old", expires_at=past))
    assert await store.authenticate(expired) is None


async def test_revocation_reaches_other_replicas_within_the_cache_ttl(db_sessionmaker: Sessions) -> None:
    clock = Clock()
    here = KeyStore(db_sessionmaker, cache_seconds=2.0, clock=clock)
    there = KeyStore(db_sessionmaker, cache_seconds=2.0, clock=clock)
    info, plaintext = await here.create(NewKey(name="to revoke"))
    assert await here.authenticate(plaintext) is not None
    assert await there.authenticate(plaintext) is not None

    revoked = await here.revoke(info.id)
    assert revoked.revoked_at is not None
    assert await here.authenticate(plaintext) is None  # the revoking replica forgets at once
    clock.now += 1.0
    assert await there.authenticate(plaintext) is not None  # still cached there ...
    clock.now += 1.01
    assert await there.authenticate(plaintext) is None  # ... but never past the TTL

    again = await here.revoke(info.id)
    assert again.revoked_at == revoked.revoked_at


async def test_unknown_keys_are_cached_briefly_and_never_longer_than_the_ttl(
    db_sessionmaker: Sessions,
) -> None:
    clock = Clock()
    here = KeyStore(db_sessionmaker, cache_seconds=0.5, clock=clock)
    there = KeyStore(db_sessionmaker, cache_seconds=0.5, clock=clock)
    plaintext = generate_key()
    assert await there.authenticate(plaintext) is None
    await here.create(NewKey(name="late"), plaintext=plaintext)
    assert await there.authenticate(plaintext) is None  # the negative answer is cached ...
    clock.now += 0.51
    assert await there.authenticate(plaintext) is not None  # ... for at most the TTL


async def test_a_key_expiring_while_cached_is_refused(db_sessionmaker: Sessions) -> None:
    store = KeyStore(db_sessionmaker, cache_seconds=60)
    soon = datetime.now(UTC) + timedelta(milliseconds=300)
    _, plaintext = await store.create(NewKey(name="brief", expires_at=soon))
    assert await store.authenticate(plaintext) is not None
    await asyncio.sleep(0.35)
    assert await store.authenticate(plaintext) is None


async def test_update_changes_only_the_given_fields(db_sessionmaker: Sessions) -> None:
    store = KeyStore(db_sessionmaker)
    info, plaintext = await store.create(
        NewKey(name="svc", rpm=10, tpm=1000, budget_usd=Decimal("5"), metadata={"team": "a"})
    )
    updated = await store.update(info.id, KeyUpdate(rpm=None, budget_usd=Decimal("7.25"), name="svc2"))
    assert updated.name == "svc2"
    assert updated.rpm is None
    assert updated.tpm == 1000
    assert updated.budget_usd == Decimal("7.25")
    assert updated.metadata == {"team": "a"}
    assert await store.get(info.id) == updated
    assert await store.authenticate(plaintext) == updated  # this replica's cache follows at once

    with pytest.raises(KeyNotFound):
        await store.update("no-such-id", KeyUpdate(name="x"))
    with pytest.raises(KeyNotFound):
        await store.revoke("no-such-id")
    assert await store.get("no-such-id") is None


@pytest.mark.parametrize(
    "fields",
    [
        {"name": ""},
        {"name": "x", "rpm": 0},
        {"name": "x", "max_concurrency": -1},
        {"name": "x", "budget_usd": Decimal("-1")},
        {"name": "x", "budget_usd": Decimal("0.000000000001")},
        {"name": "x", "expires_at": datetime(2030, 1, 1)},
    ],
)
async def test_out_of_range_fields_are_refused(db_sessionmaker: Sessions, fields: dict[str, object]) -> None:
    store = KeyStore(db_sessionmaker)
    with pytest.raises(InvalidKeyFields):
        await store.create(NewKey(**fields))  # type: ignore[arg-type]
    assert await store.count() == 0


def test_http_bodies_decode_into_the_same_structs() -> None:
    new = msgspec.json.decode(b'{"name": "a", "budget_usd": "1.50", "scope": "admin"}', type=NewKey)
    assert new.budget_usd == Decimal("1.50")
    update = msgspec.json.decode(b'{"rpm": null}', type=KeyUpdate)
    assert update.changes() == {"rpm": None}
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name": "a", "plaintext": "sk-x"}', type=NewKey)


async def test_list_count_and_preset_keys(db_sessionmaker: Sessions) -> None:
    store = KeyStore(db_sessionmaker)
    first, _ = await store.create(NewKey(name="one"))
    second, _ = await store.create(NewKey(name="two"), plaintext="sk-preset-0123456789abcdef")
    await store.revoke(first.id)
    assert await store.count() == 2
    assert [k.id for k in await store.list()] == [first.id, second.id]
    assert [k.id for k in await store.list(include_revoked=False)] == [second.id]
    assert await store.authenticate("sk-preset-0123456789abcdef") == second
    with pytest.raises(InvalidKeyFields):
        await store.create(NewKey(name="weak"), plaintext="sk-short")


async def test_only_one_first_key_among_racing_replicas(db_sessionmaker: Sessions) -> None:
    stores = [KeyStore(db_sessionmaker) for _ in range(8)]
    results = await asyncio.gather(*(s.create_first(NewKey(name="admin", scope="admin")) for s in stores))
    assert sum(result is not None for result in results) == 1
    assert await stores[0].count() == 1
    async with db_sessionmaker() as session:
        assert (await session.scalar(select(ApiKey.scope))) == "admin"
