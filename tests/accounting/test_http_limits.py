"""Per-key limits as the OpenAI SDK meets them: ``RateLimitError`` with OpenAI's codes and headers,
and no retries in vain where retrying cannot help. In-process and Redis limits, SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.gateways import create_key, forget_redis_limits, gateway, scripted_model
from tests.support.live import LiveGateway

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello!"}]
MODELS = [
    scripted_model("fast", reply="Hello there."),
    scripted_model("slow", token_delay_ms=20, end_with_eos=False, price_in="0.65", price_out="2.75"),
]


class Gateway:
    """A live gateway; keys made through it are forgotten by Redis afterwards."""

    def __init__(self, live: LiveGateway) -> None:
        self.live = live
        self.key_ids: list[str] = []
        self.requests_sent = 0

    def key(self, **fields: Any) -> str:
        key_id, key = create_key(self.live, name="limited", **fields)
        self.key_ids.append(key_id)
        return key

    @contextmanager
    def sdk(self, key: str, *, max_retries: int = 0) -> Iterator[openai.OpenAI]:
        """An SDK client that counts the HTTP requests it sends (retries included)."""

        def count(_: httpx.Request) -> None:
            self.requests_sent += 1

        http = httpx.Client(event_hooks={"request": [count]}, timeout=60)
        with openai.OpenAI(
            base_url=self.live.openai_base_url, api_key=key, max_retries=max_retries, http_client=http
        ) as client:
            yield client


@pytest.fixture
async def served(db_url_migrated: str, redis_url: str | None) -> AsyncIterator[Gateway]:
    with gateway(db_url_migrated, MODELS, redis_url=redis_url) as live:
        served = Gateway(live)
        yield served
    if redis_url is not None:
        await forget_redis_limits(redis_url, served.key_ids)


def refused(call: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        call()
    return caught.value


def test_requests_per_minute(served: Gateway) -> None:
    with served.sdk(served.key(rpm=2)) as sdk:
        first = sdk.chat.completions.with_raw_response.create(model="fast", messages=HELLO)
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        sdk.chat.completions.create(model="fast", messages=HELLO)
        error = refused(lambda: sdk.chat.completions.create(model="fast", messages=HELLO))
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # Two requests a minute: the next one is ~30 s away.
    assert 20 <= int(headers["retry-after"]) <= 30


def test_tokens_per_minute(served: Gateway) -> None:
    with served.sdk(served.key(tpm=100)) as sdk:
        first = sdk.chat.completions.with_raw_response.create(model="fast", messages=HELLO, max_tokens=60)
        usage = first.parse().usage
        assert usage is not None
        prompt_tokens = usage.prompt_tokens
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        # Admission takes the worst case (prompt + max_tokens); settling gives back what was not used.
        assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - prompt_tokens - 60)
        # The refund leaves about 100 - prompt - 3 tokens: not enough for a request of the whole minute's worth.
        whole_minute = 100 - prompt_tokens
        error = refused(lambda: sdk.chat.completions.create(model="fast", messages=HELLO, max_tokens=whole_minute))
    assert error.code == "rate_limit_exceeded"
    assert error.type == "tokens"
    assert error.response.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(error.response.headers["retry-after"]) >= 1


def test_a_request_larger_than_the_tpm_is_not_retried(served: Gateway) -> None:
    with served.sdk(served.key(tpm=100), max_retries=3) as sdk:
        error = refused(lambda: sdk.chat.completions.create(model="fast", messages=HELLO, max_tokens=500))
    assert error.code == "rate_limit_exceeded"
    assert "Request too large" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert served.requests_sent == 1


def test_concurrent_requests(served: Gateway) -> None:
    key = served.key(max_concurrency=1)
    with served.sdk(key) as sdk:
        with sdk.chat.completions.create(model="slow", messages=HELLO, max_tokens=1000, stream=True) as stream:
            next(iter(stream))  # the first request is in flight
            error = refused(lambda: sdk.chat.completions.create(model="fast", messages=HELLO))
        assert error.code == "rate_limit_exceeded"
        assert error.response.headers["retry-after"] == "1"
        # The slot comes back once the abandoned stream is settled.
        deadline = time.monotonic() + 5
        while True:
            try:
                sdk.chat.completions.create(model="fast", messages=HELLO)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot of the closed stream was not freed"
                time.sleep(0.05)


def test_an_exhausted_budget_is_final_and_the_sdk_does_not_retry(served: Gateway) -> None:
    with served.sdk(served.key(budget_usd="0.0001"), max_retries=3) as sdk:
        # Worst case: ~20 prompt tokens at $0.65 and 100 completion tokens at $2.75 per 1M: ~$0.0003.
        error = refused(lambda: sdk.chat.completions.create(model="slow", messages=HELLO, max_tokens=100))
    assert error.code == "insufficient_quota"
    assert error.type == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert served.requests_sent == 1
