from __future__ import annotations

import re
import time

from backends.base import SamplingParams
from gateway.api.replicate.predictions import PredictionStore, new_prediction_id
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime

BASE = "http://gateway.test"


def generation(runtime: ModelRuntime, prompt_tokens: int = 12, completion_tokens: int = 0) -> Generation:
    done = Generation(runtime, "req_test", list(range(prompt_tokens)), SamplingParams(max_tokens=16))
    done.completion_tokens = completion_tokens
    return done


def add(store: PredictionStore, owner: str = "key-a") -> str:
    return store.add(owner=owner, model="meta/llama-2-70b-chat", version="llama-2-chat", input={"prompt": "Hi"}).id


def test_ids_look_like_replicates() -> None:
    ids = {new_prediction_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[a-z2-7]{26}", i) for i in ids)


def test_a_prediction_is_visible_to_its_key_only() -> None:
    store = PredictionStore()
    prediction_id = add(store, "key-a")
    assert store.get(prediction_id, "key-a") is not None
    assert store.get(prediction_id, "key-b") is None
    assert store.get("nope", "key-a") is None


def test_the_json_follows_the_prediction_through_its_life(runtime: ModelRuntime) -> None:
    store = PredictionStore()
    prediction = store.get(add(store), "key-a")
    assert prediction is not None
    starting = prediction.to_json(BASE + "/")
    url = f"{BASE}/v1/predictions/{prediction.id}"
    assert starting["urls"] == {"get": url, "cancel": url + "/cancel", "stream": url + "/stream"}
    assert (starting["status"], starting["output"], starting["started_at"], starting["metrics"]) == (
        "starting",
        None,
        None,
        {},
    )
    assert starting["created_at"].endswith("Z")
    assert starting["data_removed"] is False
    assert starting["input"] == {"prompt": "Hi"}

    prediction.start()
    prediction.append("Hello")
    running = prediction.to_json(BASE)
    assert (running["status"], running["output"]) == ("processing", ["Hello"])
    assert prediction.to_json(BASE, pending_as="starting")["status"] == "starting"

    prediction.append(" there")
    prediction.finish("succeeded", generation(runtime, prompt_tokens=12, completion_tokens=2))
    done = prediction.to_json(BASE, pending_as="starting")
    assert (done["status"], done["output"], done["error"]) == ("succeeded", ["Hello", " there"], None)
    assert done["completed_at"] is not None
    metrics = done["metrics"]
    assert (metrics["input_token_count"], metrics["output_token_count"]) == (12, 2)
    assert metrics["predict_time"] >= 0


def test_pages_run_newest_first_in_both_directions() -> None:
    store = PredictionStore()
    mine = [add(store, "key-a") for _ in range(5)]
    add(store, "key-b")
    first = store.page("key-a", size=2)
    assert [p.id for p in first.results] == mine[4:2:-1]
    assert first.previous_after is None
    second = store.page("key-a", before=first.next_before, size=2)
    assert [p.id for p in second.results] == mine[2:0:-1]
    last = store.page("key-a", before=second.next_before, size=2)
    assert [p.id for p in last.results] == mine[:1]
    assert last.next_before is None
    back = store.page("key-a", after=last.previous_after, size=2)
    assert [p.id for p in back.results] == mine[2:0:-1]
    assert store.page("key-c").results == []


def test_finished_predictions_are_dropped_beyond_the_cap(runtime: ModelRuntime) -> None:
    store = PredictionStore(max_finished=2)
    ids = [add(store) for _ in range(3)]
    for prediction_id in ids:
        prediction = store.get(prediction_id, "key-a")
        assert prediction is not None
        prediction.finish("succeeded", generation(runtime))
    running = add(store)  # room for this one: the two oldest finished go
    assert [store.get(i, "key-a") is not None for i in ids] == [False, False, True]
    assert store.get(running, "key-a") is not None


def test_finished_predictions_expire_but_running_ones_stay(runtime: ModelRuntime) -> None:
    store = PredictionStore(retention_seconds=0.001)
    finished, running = add(store), add(store)
    prediction = store.get(finished, "key-a")
    assert prediction is not None
    prediction.finish("canceled", generation(runtime))
    time.sleep(0.01)
    add(store)
    assert store.get(finished, "key-a") is None
    assert store.get(running, "key-a") is not None
    assert len(store) == 2
