"""What a key may reach: only its allowed models, and nothing at all once revoked, on every replica
within ``key_cache_seconds``."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.gateways import admin_client, bearer, create_key, gateway, scripted_model

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]
MODELS = [scripted_model("open-model"), scripted_model("other-model"), scripted_model("third-model")]
KEY_CACHE_SECONDS = 1.0


def sdk(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_a_key_reaches_only_its_models(db_url_migrated: str) -> None:
    with gateway(db_url_migrated, MODELS) as live:
        key_id, key = create_key(live, name="narrow", allowed_models=["open-model", "third-model"])
        with sdk(live.base_url, key) as client:
            assert [m.id for m in client.models.list()] == ["open-model", "third-model"]
            assert client.models.retrieve("open-model").id == "open-model"
            reply = client.chat.completions.create(model="open-model", messages=HELLO)
            assert reply.choices[0].message.content

            for call in (
                lambda: client.chat.completions.create(model="other-model", messages=HELLO),
                lambda: client.completions.create(model="other-model", prompt="Hi"),
                lambda: client.models.retrieve("other-model"),
            ):
                with pytest.raises(openai.NotFoundError) as caught:
                    call()
                assert caught.value.code == "model_not_found"
                assert "other-model" in caught.value.message

            # Widening the key takes effect at once on the replica that changed it.
            with admin_client(live) as admin:
                assert admin.patch(f"/admin/keys/{key_id}", json={"allowed_models": None}).status_code == 200
            assert len(client.models.list().data) == len(MODELS)
            client.chat.completions.create(model="other-model", messages=HELLO)


def test_revocation_reaches_every_replica_within_the_key_cache_time(db_url_migrated: str) -> None:
    options = {"key_cache_seconds": KEY_CACHE_SECONDS}
    with (
        gateway(db_url_migrated, MODELS, **options) as first,
        gateway(db_url_migrated, MODELS, **options, initial_admin_key=first.admin_key) as second,
    ):
        key_id, key = create_key(first, name="soon revoked")
        body = {"model": "open-model", "messages": HELLO}
        with (
            httpx.Client(base_url=first.base_url, headers=bearer(key)) as on_first,
            httpx.Client(base_url=second.base_url, headers=bearer(key)) as on_second,
            admin_client(second) as admin,
        ):
            assert on_first.post("/v1/chat/completions", json=body).status_code == 200
            # Both replicas now hold the key in their caches.
            assert on_second.post("/v1/chat/completions", json=body).status_code == 200

            revoked = admin.post(f"/admin/keys/{key_id}/revoke")
            revoked_at = time.monotonic()
            assert revoked.json()["status"] == "revoked"
            # The replica that revoked it refuses the key at once ...
            refusal = on_second.post("/v1/chat/completions", json=body)
            assert refusal.status_code == 401
            assert refusal.json()["error"]["code"] == "invalid_api_key"
            # ... the other one once its cached answer expires.
            while on_first.get("/v1/models").status_code == 200:
                assert time.monotonic() - revoked_at < KEY_CACHE_SECONDS + 2, "a revoked key is still accepted"
                time.sleep(0.05)
            assert on_first.post("/v1/chat/completions", json=body).status_code == 401
