"""Replicate's own Python client against a live gateway: run, stream, poll, cancel, list, errors,
and usage rows that match the metrics and the OpenAI path's counts for the same dialogue."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from replicate.client import Client
from replicate.exceptions import ReplicateError
from replicate.prediction import Prediction

from gateway.accounting.usage import cost
from gateway.api.replicate import predictions
from gateway.db.column_types import MONEY_SCALE
from gateway.settings import Pricing
from tests.support.model_configs import replace_struct, scripted_model, tiny_llama2_model
from tests.support.served import Served, serve

TINY = "tiny-llama-2-chat"
HOSTED = "meta/llama-2-70b-chat"
PINNED = "0123456789abcdef" * 4  # an operator pins existing code's version hash by naming it an alias
FAST, SLOW, TIMED, BILLED = "scripted-fast", "scripted-slow", "scripted-timed", "scripted-billed"
FAST_REPLY = "Paris is the capital of France."
TIMED_REPLY = " ".join(f"word{i}" for i in range(30))
HOSTED_PRICES = Pricing(input_per_million=Decimal("0.65"), output_per_million=Decimal("2.75"))
SYSTEM = "You are a terse assistant. Answer in one word."
DIALOGUE = (
    "[INST] Hi! [/INST]\nHello! How are you?\n"
    "[INST] I'm great, thanks for asking. Could you help me with a task? [/INST]"
)
DIALOGUE_MESSAGES = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "I'm great, thanks for asking. Could you help me with a task?"},
]
# The same sampler settings on both APIs, so the tiny model's outputs can be compared too.
SAMPLING: dict[str, Any] = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "seed": 7}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    models = [
        tiny_llama2_model(tiny_model_dir, name=TINY, aliases=[HOSTED, PINNED], pricing=HOSTED_PRICES),
        scripted_model(FAST, max_concurrency=8, reply=FAST_REPLY),
        scripted_model(SLOW, token_delay_ms=20, end_with_eos=False),
        scripted_model(TIMED, max_concurrency=4, token_delay_ms=40, reply=TIMED_REPLY),
        replace_struct(scripted_model(BILLED, reply=FAST_REPLY), pricing=HOSTED_PRICES),
    ]
    with serve(tmp_path_factory, models) as served:
        yield served


class CreatedRequests:
    """Collects the ``x-request-id`` of every prediction create: the usage row's request id."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith("/predictions"):
            self.ids.append(response.headers["x-request-id"])


def client_for(served: Served, token: str | None = None, created: CreatedRequests | None = None) -> Client:
    hooks = {"response": [created]} if created is not None else {}
    client = Client(api_token=token or served.live.admin_key, base_url=served.live.base_url, event_hooks=hooks)
    client.poll_interval = 0.05
    return client


def cli_json(served: Served, *args: str) -> Any:
    from gateway.cli.main import main

    env = {"LLAMA_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{served.db_path}", "LLAMA_GATEWAY_CONFIG": ""}
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def new_key(served: Served, name: str, *options: str) -> str:
    key: str = cli_json(served, "keys", "create", "--name", name, "--json", *options)["key"]
    return key


def stored_money(value: int) -> Decimal:
    """A money column as SQLite holds it: an integer count of 1e-10 USD."""
    return Decimal(value).scaleb(-MONEY_SCALE)


def metrics_of(prediction: Prediction) -> dict[str, Any]:
    assert prediction.metrics is not None
    return prediction.metrics


def wait_for_output(client: Client, prediction_id: str, pieces: int) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        prediction = client.predictions.get(prediction_id)
        if len(prediction.output or []) >= pieces:
            return prediction
        time.sleep(0.02)
    raise AssertionError(f"prediction {prediction_id} produced fewer than {pieces} pieces in time")


def test_run_answers_synchronously_with_the_output_pieces(served: Served) -> None:
    client = client_for(served)
    output = client.run(HOSTED, input={"prompt": "Hello", "max_new_tokens": 8, "min_new_tokens": 8, "seed": 1})
    assert isinstance(output, list)
    assert all(isinstance(piece, str) for piece in output)
    newest = client.predictions.list().results[0]
    assert newest.status == "succeeded"
    assert newest.model == HOSTED
    assert newest.output == output
    assert newest.metrics is not None
    assert newest.metrics["output_token_count"] == 8
    assert newest.input == {"prompt": "Hello", "max_new_tokens": 8, "min_new_tokens": 8, "seed": 1}


def test_run_with_a_pinned_version_iterates_over_the_pieces(served: Served) -> None:
    client = client_for(served)
    model = client.models.get(HOSTED)
    assert model.latest_version is not None
    assert model.latest_version.id == PINNED
    schema = model.versions.get(PINNED).openapi_schema["components"]["schemas"]
    assert schema["Input"]["required"] == ["prompt"]
    assert schema["Input"]["properties"]["max_new_tokens"]["default"] == 500
    output = client.run(f"{HOSTED}:{PINNED}", input={"prompt": "Hi", "max_new_tokens": 4, "min_new_tokens": 4})
    pieces = list(output)
    assert all(isinstance(piece, str) for piece in pieces)
    newest = client.predictions.list().results[0]
    assert (newest.model, newest.version, newest.output) == (HOSTED, PINNED, pieces)


def test_stream_yields_output_events_then_done(served: Served) -> None:
    events = list(client_for(served).stream(f"local/{FAST}", input={"prompt": "Capital of France?"}))
    kinds = [event.event.value for event in events]
    assert kinds == ["output"] * (len(events) - 1) + ["done"]
    assert "".join(str(event) for event in events) == FAST_REPLY
    assert events[-1].data == "{}"


def test_create_then_poll_to_succeeded_with_a_usage_row(served: Served) -> None:
    created = CreatedRequests()
    client = client_for(served, created=created)
    created_as = client.predictions.create(version=TINY, input={"prompt": "Tell me a story", "max_new_tokens": 5})
    assert created_as.status == "starting"
    assert created_as.urls is not None
    assert set(created_as.urls) == {"get", "cancel", "stream"}
    created_as.wait()
    prediction = client.predictions.get(created_as.id)
    assert prediction.status == "succeeded"
    assert prediction.model == HOSTED
    assert prediction.started_at is not None
    assert prediction.completed_at is not None
    metrics = prediction.metrics or {}
    assert 1 <= metrics["output_token_count"] <= 5
    assert metrics["predict_time"] >= 0
    row = served.usage_row(created.ids[-1])
    assert row["endpoint"] == "/v1/predictions"
    assert row["model"] == TINY
    assert row["status"] in ("completed", "length")
    assert row["prompt_tokens"] == metrics["input_token_count"]
    assert row["completion_tokens"] == metrics["output_token_count"]
    assert stored_money(row["input_price_per_million"]) == Decimal("0.65")
    assert stored_money(row["output_price_per_million"]) == Decimal("2.75")


def test_cancel_stops_a_running_prediction_and_records_it_as_cancelled(served: Served) -> None:
    created = CreatedRequests()
    client = client_for(served, created=created)
    prediction = client.predictions.create(version=SLOW, input={"prompt": "Go on forever", "max_new_tokens": 4000})
    running = wait_for_output(client, prediction.id, 3)
    assert running.status == "processing"
    canceled = client.predictions.cancel(prediction.id)
    assert canceled.status == "canceled"
    produced = metrics_of(canceled)["output_token_count"]
    assert 3 <= produced < 4000
    row = served.usage_row(created.ids[-1])
    assert row["status"] == "cancelled"
    assert row["completion_tokens"] == produced
    assert row["prompt_tokens"] == metrics_of(canceled)["input_token_count"]
    # It stays canceled, and its stream replays what it produced, then says why it ended.
    time.sleep(0.1)
    assert client.predictions.get(prediction.id).output == canceled.output
    events = list(canceled.stream())
    assert [str(e) for e in events[:-1]] == canceled.output
    assert events[-1].event.value == "done"
    assert json.loads(events[-1].data) == {"reason": "canceled"}


def test_a_late_stream_replays_the_pieces_so_far_then_follows(served: Served) -> None:
    client = client_for(served)
    prediction = client.predictions.create(version=TIMED, input={"prompt": "Count"})
    wait_for_output(client, prediction.id, 5)
    events = list(prediction.stream())
    assert events[0].id == "0"
    pieces = [str(event) for event in events if event.event.value == "output"]
    assert "".join(pieces) == TIMED_REPLY
    assert client.predictions.get(prediction.id).output == pieces


def test_prefer_wait_that_runs_out_answers_starting_and_the_client_polls_on(served: Served) -> None:
    client = client_for(served)
    pending = client.predictions.create(version=TIMED, input={"prompt": "Count"}, wait=1)
    assert pending.status == "starting"
    output = client.run(f"local/{TIMED}", input={"prompt": "Count"}, wait=1)
    assert "".join(output) == TIMED_REPLY
    pending.wait()
    assert client.predictions.get(pending.id).status == "succeeded"


def test_prefer_wait_header_is_honoured_on_the_raw_api(served: Served) -> None:
    # Replicate's curl examples send "Token"; its clients send "Bearer". Both are accepted.
    headers = {"Authorization": f"Token {served.live.admin_key}", "Prefer": "wait=5"}
    response = httpx.post(
        served.live.base_url + "/v1/models/local/" + FAST + "/predictions",
        json={"input": {"prompt": "Capital of France?"}},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "succeeded"
    assert "".join(body["output"]) == FAST_REPLY
    assert response.headers["location"] == body["urls"]["get"]
    assert response.headers["preference-applied"] == "wait=5"


def test_list_pages_newest_first_and_only_the_callers_own(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(predictions, "PAGE_SIZE", 2)
    key = new_key(served, "replicate lister")
    client = client_for(served, token=key)
    ids = [client.predictions.create(version=FAST, input={"prompt": f"n{i}"}, wait=True).id for i in range(5)]
    pages = []
    page = client.predictions.list()
    while True:
        pages.append([p.id for p in page])
        if page.next is None:
            break
        page = client.predictions.list(page.next)
    assert pages == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    assert page.previous is not None
    back = client.predictions.list(page.previous)
    assert [p.id for p in back] == ids[2:0:-1]
    admin = client_for(served)
    with pytest.raises(ReplicateError) as missing:
        admin.predictions.get(ids[0])
    assert missing.value.status == 404
    assert not {p.id for p in admin.predictions.list()} & set(ids)


def test_bad_and_missing_keys_are_refused(served: Served) -> None:
    with pytest.raises(ReplicateError) as refused:
        client_for(served, token="sk-not-a-real-key-0123456789").run(HOSTED, input={"prompt": "Hi"})
    assert refused.value.status == 401
    assert refused.value.title == "Unauthenticated"
    response = httpx.get(served.live.base_url + "/v1/predictions", timeout=10)
    assert response.status_code == 401
    assert response.json()["status"] == 401


def test_malformed_requests_are_400(served: Served) -> None:
    url = served.live.base_url + "/v1/predictions"
    not_json = httpx.post(url, content=b"{nope", headers=served.headers, timeout=10)
    assert (not_json.status_code, not_json.json()["status"]) == (400, 400)
    bad_cursor = httpx.get(url, params={"cursor": "!!"}, headers=served.headers, timeout=10)
    assert (bad_cursor.status_code, bad_cursor.json()["detail"]) == (400, "The cursor is not valid.")


def test_invalid_input_is_a_422_naming_each_field(served: Served) -> None:
    with pytest.raises(ReplicateError) as rejected:
        client_for(served).predictions.create(version=FAST, input={"temperature": 9, "max_new_tokens": 0})
    assert rejected.value.status == 422
    detail = rejected.value.detail or ""
    for field in ("input.prompt", "input.temperature", "input.max_new_tokens"):
        assert field in detail


def test_unknown_models_and_versions_are_404(served: Served) -> None:
    client = client_for(served)
    with pytest.raises(ReplicateError) as by_pin:
        client.run(f"{HOSTED}:{'f' * 64}", input={"prompt": "Hi"})
    assert by_pin.value.status == 404
    with pytest.raises(ReplicateError) as by_model:
        client.run("meta/llama-2-13b-chat", input={"prompt": "Hi"})
    assert by_model.value.status == 404
    with pytest.raises(ReplicateError) as by_version:
        client.predictions.create(version="0" * 64, input={"prompt": "Hi"})
    assert by_version.value.status == 404


def test_limits_apply_as_to_openai_requests(served: Served) -> None:
    client = client_for(served, token=new_key(served, "replicate limited", "--rpm", "1"))
    client.predictions.create(version=FAST, input={"prompt": "one"})
    with pytest.raises(ReplicateError) as throttled:
        client.predictions.create(version=FAST, input={"prompt": "two"})
    assert throttled.value.status == 429


def test_predictions_appear_in_the_usage_report(served: Served) -> None:
    client = client_for(served)
    runs = [client.predictions.create(version=BILLED, input={"prompt": p}, wait=True) for p in ("a", "bb cc")]
    assert all(p.status == "succeeded" for p in runs)
    report = cli_json(served, "usage", "report", "--model", BILLED, "--group-by", "model", "--format", "json")
    total = report["total"]
    assert total["requests"] == 2
    counts = [(metrics_of(p)["input_token_count"], metrics_of(p)["output_token_count"]) for p in runs]
    assert total["prompt_tokens"] == sum(prompt for prompt, _ in counts)
    assert total["completion_tokens"] == sum(completion for _, completion in counts)
    expected = sum(
        (cost(prompt, Decimal("0.65")) + cost(completion, Decimal("2.75")) for prompt, completion in counts),
        Decimal(0),
    )
    assert Decimal(total["total_cost_usd"]) == expected


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [
        ("What is the capital of France?", [{"role": "user", "content": "What is the capital of France?"}]),
        (DIALOGUE, DIALOGUE_MESSAGES),
    ],
    ids=["prompt", "dialogue"],
)
def test_token_counts_equal_the_usage_row_and_the_openai_path(
    served: Served, prompt: str, messages: list[dict[str, str]]
) -> None:
    created = CreatedRequests()
    # (predictions.create(model=...) drops ``wait`` on its way to models.predictions.create.)
    prediction = client_for(served, created=created).models.predictions.create(
        model=HOSTED,
        input={"prompt": prompt, "system_prompt": SYSTEM, "max_new_tokens": 6, "min_new_tokens": 6, **SAMPLING},
        wait=True,
    )
    assert prediction.status == "succeeded"
    metrics = prediction.metrics or {}
    row = served.usage_row(created.ids[-1])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        metrics["input_token_count"],
        metrics["output_token_count"],
    )
    chat = served.client().chat.completions.create(
        model=HOSTED,
        messages=[{"role": "system", "content": SYSTEM}, *messages],  # type: ignore[list-item]
        max_tokens=6,
        temperature=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        seed=SAMPLING["seed"],
        extra_body={"top_k": SAMPLING["top_k"], "repetition_penalty": SAMPLING["repetition_penalty"], "min_tokens": 6},
    )
    assert chat.usage is not None
    assert metrics["input_token_count"] == chat.usage.prompt_tokens
    assert metrics["output_token_count"] == chat.usage.completion_tokens == 6
    assert "".join(prediction.output or []) == chat.choices[0].message.content
