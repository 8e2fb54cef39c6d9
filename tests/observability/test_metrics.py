"""``/metrics`` after real requests: counts, tokens, cost, latencies, live gauges; several workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.accounting.usage.pricing import cost
from gateway.observability.metrics import GatewayMetrics
from gateway.settings import Settings
from tests.support.gateway_process import (
    INPUT_PRICE,
    OUTPUT_PRICE,
    chat_request_body,
    gateway_process,
    metric_samples,
    sample,
    scripted_model,
    wait_for,
)
from tests.support.live import LiveGateway, running_gateway

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('metrics') / 'gateway.db'}",
        models=[
            scripted_model(),
            scripted_model("slow", max_concurrency=1, token_delay_ms=50, end_with_eos=False),
        ],
    )
    with running_gateway(settings) as served:
        yield served


def _scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return metric_samples(response.text)


def test_metrics_after_real_requests(live: LiveGateway) -> None:
    headers = {"Authorization": f"Bearer {live.admin_key}"}
    before = _scrape(live.base_url)
    usages = []
    with httpx.Client(base_url=live.base_url, headers=headers, timeout=30) as client:
        for body in (
            chat_request_body(max_tokens=4),
            chat_request_body(max_tokens=200),  # ends with the reply's EOS: 10 tokens
            chat_request_body(stream=True, stream_options={"include_usage": True}, max_tokens=6),
        ):
            response = client.post(CHAT, json=body)
            assert response.status_code == 200
            if body.get("stream"):
                events = [json.loads(e[6:]) for e in response.text.split("\n\n") if e.startswith("data: {")]
                usages.append(next(event["usage"] for event in events if event.get("usage")))
            else:
                usages.append(response.json()["usage"])
        completion = client.post("/v1/completions", json={"model": "scripted", "prompt": "Hi", "max_tokens": 5})
        usages.append(completion.json()["usage"])
        assert client.post(CHAT, json={**chat_request_body(), "model": "nope"}).status_code == 404
    assert httpx.post(live.base_url + CHAT, json=chat_request_body()).status_code == 401
    after = _scrape(live.base_url)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    requests = "llama_gateway_requests_total"
    assert grew(requests, route=CHAT, method="POST", model="scripted", status="200") == 3
    assert grew(requests, route="/v1/completions", method="POST", model="scripted", status="200") == 1
    assert grew(requests, route=CHAT, method="POST", model="", status="404") == 1
    assert grew(requests, route=CHAT, method="POST", model="", status="401") == 1

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    completion_tokens = sum(u["completion_tokens"] for u in usages)
    assert completion_tokens == 4 + 10 + 6 + 5
    assert grew("llama_gateway_prompt_tokens_total", model="scripted") == prompt_tokens
    assert grew("llama_gateway_completion_tokens_total", model="scripted") == completion_tokens
    expected_cost = sum(
        cost(u["prompt_tokens"], INPUT_PRICE) + cost(u["completion_tokens"], OUTPUT_PRICE) for u in usages
    )
    assert grew("llama_gateway_cost_usd_total", model="scripted") == pytest.approx(float(expected_cost))
    assert grew("llama_gateway_generations_total", model="scripted", status="length") == 3
    assert grew("llama_gateway_generations_total", model="scripted", status="completed") == 1

    assert grew("llama_gateway_time_to_first_token_seconds_count", model="scripted") == 4
    assert grew("llama_gateway_time_to_first_token_seconds_sum", model="scripted") > 0
    # One gap between each pair of consecutive tokens of a generation.
    assert grew("llama_gateway_inter_token_latency_seconds_count", model="scripted") == completion_tokens - 4
    assert grew("llama_gateway_request_duration_seconds_count", model="scripted", endpoint=CHAT) == 3
    assert grew("llama_gateway_request_duration_seconds_count", model="scripted", endpoint="/v1/completions") == 1

    assert sample(after, "llama_gateway_database_up") == 1
    assert sample(after, "llama_gateway_backend_up", model="scripted") == 1
    assert sample(after, "llama_gateway_backend_up", model="slow") == 1
    assert sample(after, "llama_gateway_draining") == 0
    assert sample(after, "llama_gateway_usage_backlog") == 0
    assert sample(after, "llama_gateway_usage_write_failures_total") == 0
    assert sample(after, "llama_gateway_usage_rows_rejected_total") == 0


async def test_queue_depth_and_running_requests_are_live(live: LiveGateway) -> None:
    headers = {"Authorization": f"Bearer {live.admin_key}"}
    async with httpx.AsyncClient(base_url=live.base_url, headers=headers, timeout=30) as client:
        holder_started = asyncio.Event()

        async def hold_the_slot() -> None:
            body = {**chat_request_body(stream=True, max_tokens=40), "model": "slow"}  # 2 s
            async with client.stream("POST", CHAT, json=body) as response:
                async for _ in response.aiter_bytes():
                    holder_started.set()

        holder = asyncio.create_task(hold_the_slot())
        await asyncio.wait_for(holder_started.wait(), 10)
        waiter = asyncio.create_task(client.post(CHAT, json={**chat_request_body(max_tokens=2), "model": "slow"}))

        async def scrape_until_queued() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            while True:
                samples = metric_samples((await client.get("/metrics")).text)
                if sample(samples, "llama_gateway_queue_depth", model="slow") == 1:
                    return samples
                await asyncio.sleep(0.05)

        during = await asyncio.wait_for(scrape_until_queued(), 5)
        assert sample(during, "llama_gateway_running_requests", model="slow") == 1
        assert sample(during, "llama_gateway_running_requests", model="scripted") == 0
        assert sample(during, "llama_gateway_requests_in_flight") >= 3  # two generations and the scrape
        await holder
        assert (await waiter).status_code == 200
        after = metric_samples((await client.get("/metrics")).text)
    assert sample(after, "llama_gateway_queue_depth", model="slow") == 0
    assert sample(after, "llama_gateway_running_requests", model="slow") == 0


@pytest.mark.redis
def test_several_workers_report_one_aggregate(tmp_path: Path, redis_server: str) -> None:
    model = scripted_model(token_delay_ms=20)
    with gateway_process(tmp_path, models=[model], workers=2, redis_url=redis_server) as gateway:
        sent = 0

        def one(_: int) -> None:
            with gateway.client() as client:
                assert client.post(CHAT, json=chat_request_body(max_tokens=3)).status_code == 200

        def served_by_both() -> bool:
            nonlocal sent
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(8)))
            sent += 8
            pids = {line["pid"] for line in gateway.request_lines() if line["path"] == CHAT}
            return len(pids) == 2

        wait_for(served_by_both, 60, "every request went to the same worker")
        wait_for(lambda: len([ln for ln in gateway.request_lines() if ln["path"] == CHAT]) == sent, 10, "lines")

        samples = metric_samples(httpx.get(gateway.base_url + "/metrics", timeout=10).text)
        served = sample(
            samples, "llama_gateway_requests_total", route=CHAT, method="POST", model="scripted", status="200"
        )
        assert served == sent
        assert sample(samples, "llama_gateway_completion_tokens_total", model="scripted") == 3 * sent
        assert sample(samples, "llama_gateway_generations_total", model="scripted", status="length") == sent
        assert sample(samples, "llama_gateway_time_to_first_token_seconds_count", model="scripted") == sent
        assert sample(samples, "llama_gateway_inter_token_latency_seconds_count", model="scripted") == 2 * sent
        assert sample(samples, "llama_gateway_database_up") == 1
        assert sample(samples, "llama_gateway_backend_up", model="scripted") == 1
        gateway.terminate()
        assert gateway.wait_exit() == 0


def test_labelled_samples_are_the_metrics_own_children() -> None:
    metrics = GatewayMetrics()
    first = metrics.child(metrics.requests, "/v1/models", "GET", "", "200")
    assert first is metrics.requests.labels("/v1/models", "GET", "", "200")
    assert metrics.child(metrics.requests, "/v1/models", "GET", "", "200") is first
    assert metrics.child(metrics.requests, "/v1/models", "GET", "", "401") is not first
    assert metrics.child(metrics.cost, "m") is not metrics.child(metrics.prompt_tokens, "m")
    first.inc()
    families = {family.name: family for family in metrics.registry.collect()}
    samples = [s for s in families["llama_gateway_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels["status"], s.value) for s in samples] == [("200", 1.0), ("401", 0.0)]
