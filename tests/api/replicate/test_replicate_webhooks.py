"""Prediction webhooks, received by a real HTTP receiver from a real gateway process: signed so
that Replicate's own ``validate`` accepts them with the published secret, in order, filtered,
retried on failure with the same id, and delivered after a restart when the receiver was down."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from replicate.client import Client
from replicate.webhook import Webhooks, WebhookSigningSecret

from gateway.api.replicate.webhooks import new_secret, retry_delay, signature
from tests.support.gateway_process import REPLY, GatewayProcess, gateway_process, scripted_model
from tests.support.live import free_port
from tests.support.webhook_receiver import Delivery, Receiver, webhook_receiver

FAST, TIMED = "scripted", "scripted-timed"
API_KEY = "sk-test-webhooks-0123456789abcdefghijkl"


def start_gateway(directory: Path, port: int) -> Any:
    return gateway_process(
        directory,
        models=[scripted_model(FAST), scripted_model(TIMED, token_delay_ms=40)],
        port=port,
        api_key=API_KEY,
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with start_gateway(tmp_path_factory.mktemp("webhooks"), free_port()) as served:
        yield served


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as made:
        yield made


def client(gateway: GatewayProcess) -> Client:
    return Client(api_token=gateway.api_key, base_url=gateway.base_url)


def verified(deliveries: list[Delivery], secret: WebhookSigningSecret) -> list[dict[str, Any]]:
    """Each delivery's prediction, after Replicate's client checked its signature."""
    for delivery in deliveries:
        Webhooks.validate(headers=delivery.headers, body=delivery.body, secret=secret, tolerance=300)
    return [d.prediction for d in deliveries]


def completed(deliveries: list[Delivery]) -> bool:
    return any(d.status == 200 and d.prediction["status"] in {"succeeded", "failed", "canceled"} for d in deliveries)


def test_the_signature_is_the_one_replicates_client_checks() -> None:
    secret = new_secret()
    body = '{"id": "abc", "status": "succeeded"}'
    headers = {"webhook-id": "msg_1", "webhook-timestamp": "1700000000", "webhook-signature": ""}
    headers["webhook-signature"] = signature(secret, "msg_1", 1700000000, body)
    Webhooks.validate(headers=headers, body=body, secret=WebhookSigningSecret(key=secret))
    with pytest.raises(ValueError, match="invalid"):
        Webhooks.validate(
            headers=headers, body=body.replace("succeeded", "failed"), secret=WebhookSigningSecret(key=secret)
        )
    assert [retry_delay(n) for n in (1, 2, 3, 20)] == [1.0, 2.0, 4.0, 300.0]


def test_every_event_arrives_signed_and_in_order(gateway: GatewayProcess, receiver: Receiver) -> None:
    secret = client(gateway).webhooks.default.secret()
    assert secret.key.startswith("whsec_")
    assert client(gateway).webhooks.default.secret().key == secret.key, "one secret per key"
    made = client(gateway).predictions.create(
        version=TIMED, input={"prompt": "Hi", "max_new_tokens": 30}, webhook=receiver.url("/all")
    )
    bodies = verified(receiver.wait_for("/all", completed), secret)
    assert {b["id"] for b in bodies} == {made.id}
    statuses = [b["status"] for b in bodies]
    assert statuses[0] == "processing", "the start event comes first"
    assert statuses[-1] == "succeeded"
    assert all(s == "processing" for s in statuses[:-1])
    outputs = ["".join(b["output"] or []) for b in bodies]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(outputs)), (
        "each event shows the output so far"
    )
    stored = client(gateway).predictions.get(made.id)
    assert outputs[-1] == "".join(stored.output or []) == REPLY
    assert bodies[-1]["metrics"] == stored.metrics
    ids = [d.headers["webhook-id"] for d in receiver.received("/all")]
    assert len(set(ids)) == len(ids)


def test_the_filter_chooses_the_events(gateway: GatewayProcess, receiver: Receiver) -> None:
    secret = client(gateway).webhooks.default.secret()
    client(gateway).predictions.create(
        version=FAST, input={"prompt": "Hi"}, webhook=receiver.url("/done"), webhook_events_filter=["completed"]
    )
    (body,) = verified(receiver.wait_for("/done", completed), secret)
    assert (body["status"], "".join(body["output"])) == ("succeeded", REPLY)
    assert body["webhook_events_filter"] == ["completed"]


def test_a_failing_receiver_gets_the_same_delivery_again(gateway: GatewayProcess, receiver: Receiver) -> None:
    secret = client(gateway).webhooks.default.secret()
    receiver.failures["/flaky"] = 2
    client(gateway).predictions.create(
        version=FAST, input={"prompt": "Hi"}, webhook=receiver.url("/flaky"), webhook_events_filter=["completed"]
    )
    deliveries = receiver.wait_for("/flaky", completed)
    assert [d.status for d in deliveries] == [500, 500, 200]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1, "a retry keeps its webhook-id"
    verified(deliveries, secret)


def test_invalid_webhooks_are_422s(gateway: GatewayProcess) -> None:
    url = gateway.base_url + "/v1/predictions"
    for fields in (
        {"webhook": "ftp://example.com/hook"},
        {"webhook": "not a url"},
        {"webhook": "http://[::1/hook"},
        {"webhook": "https://example.com/" + "a" * 3000},
        {"webhook": "https://example.com/hook", "webhook_events_filter": ["everything"]},
        {"webhook": "https://example.com/hook", "webhook_events_filter": "completed"},
        {"webhook": 7},
    ):
        response = httpx.post(
            url, json={"version": FAST, "input": {"prompt": "Hi"}, **fields}, headers=gateway.headers, timeout=10
        )
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["invalid_fields"]


def test_a_delivery_owed_when_the_gateway_stopped_is_sent_after_its_restart(tmp_path: Path) -> None:
    hook_port, gateway_port = free_port(), free_port()
    with start_gateway(tmp_path, gateway_port) as first:
        secret = client(first).webhooks.default.secret()
        # Nobody listens at the hook yet: the completed event fails and waits for a retry.
        made = client(first).predictions.create(
            version=FAST,
            input={"prompt": "Hi"},
            webhook=f"http://127.0.0.1:{hook_port}/later",
            webhook_events_filter=["completed"],
        )
        made.wait()
    with webhook_receiver(hook_port) as late_receiver, start_gateway(tmp_path, gateway_port):
        (body,) = verified(late_receiver.wait_for("/later", completed, timeout=60), secret)
    assert (body["id"], body["status"]) == (made.id, "succeeded")
