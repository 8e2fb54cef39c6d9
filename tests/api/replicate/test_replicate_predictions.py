"""The prediction object's JSON through its life, and predictions stored in the database."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backends.base import SamplingParams
from gateway.api.replicate.predictions import new_prediction_id
from gateway.api.replicate.records import RUNNER_GONE, PredictionRecords
from gateway.db.tables import PredictionRecord
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from tests.support.prediction_records import new_prediction

BASE = "http://gateway.test"
RUNNER = "runner-1"


def generation(runtime: ModelRuntime, prompt_tokens: int = 12, completion_tokens: int = 0) -> Generation:
    done = Generation(runtime, "req_test", list(range(prompt_tokens)), SamplingParams(max_tokens=16))
    done.completion_tokens = completion_tokens
    return done


async def add(records: PredictionRecords, owner: str = "key-a") -> str:
    prediction = new_prediction(owner)
    await records.insert(prediction, RUNNER)
    return prediction.id


def test_ids_look_like_replicates() -> None:
    ids = {new_prediction_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[a-z2-7]{26}", i) for i in ids)


async def test_a_prediction_is_visible_to_its_key_only(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    records = PredictionRecords(sessionmaker)
    prediction_id = await add(records, "key-a")
    assert await records.get(prediction_id, "key-a") is not None
    assert await records.get(prediction_id, "key-b") is None
    assert await records.get("nope", "key-a") is None


def test_the_json_follows_the_prediction_through_its_life(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    starting = prediction.to_json()
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
    running = prediction.to_json()
    assert (running["status"], running["output"]) == ("processing", ["Hello"])
    assert prediction.to_json(pending_as="starting")["status"] == "starting"

    prediction.append(" there")
    prediction.finish("succeeded", generation(runtime, prompt_tokens=12, completion_tokens=2))
    done = prediction.to_json(pending_as="starting")
    assert (done["status"], done["output"], done["error"]) == ("succeeded", ["Hello", " there"], None)
    assert done["completed_at"] is not None
    metrics = done["metrics"]
    assert (metrics["input_token_count"], metrics["output_token_count"]) == (12, 2)
    assert metrics["predict_time"] >= 0


def test_an_end_shows_only_once_it_is_announced(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    prediction.conclude("succeeded", generation(runtime, completion_tokens=1))
    hidden = prediction.to_json()
    assert (hidden["status"], hidden["completed_at"], hidden["metrics"]) == ("processing", None, {})
    assert prediction.to_json(concluded=True)["status"] == "succeeded"
    prediction.announce_end()
    assert prediction.done
    assert prediction.to_json()["status"] == "succeeded"


async def test_a_stored_prediction_reads_back_as_it_was_written(
    sessionmaker: async_sessionmaker[AsyncSession], runtime: ModelRuntime
) -> None:
    records = PredictionRecords(sessionmaker)
    prediction = new_prediction(webhook="http://hooks.test/in", webhook_events=("completed",))
    await records.insert(prediction, RUNNER)
    stored = await records.get(prediction.id, "key-a")
    assert stored is not None
    assert stored.to_json() == prediction.to_json()
    prediction.start()
    prediction.append("Hello")
    await records.save_progress(prediction, RUNNER, ["start", "output"])
    running = await records.get(prediction.id, "key-a")
    assert running is not None
    assert (running.status, running.output, running.done) == ("processing", ["Hello"], False)
    prediction.append(" there")
    prediction.conclude("succeeded", generation(runtime, completion_tokens=2))
    assert await records.finish(prediction)
    prediction.announce_end()
    ended = await records.get(prediction.id, "key-a")
    assert ended is not None
    assert ended.done
    assert ended.to_json() == prediction.to_json()
    assert not await records.finish(prediction), "an end is stored once"


async def test_pages_run_newest_first_in_both_directions(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    records = PredictionRecords(sessionmaker)
    mine = [await add(records, "key-a") for _ in range(5)]
    await add(records, "key-b")
    first = await records.page("key-a", before=None, after=None, size=2)
    assert [p.id for p in first.results] == mine[4:2:-1]
    assert first.previous_after is None
    second = await records.page("key-a", before=first.next_before, after=None, size=2)
    assert [p.id for p in second.results] == mine[2:0:-1]
    last = await records.page("key-a", before=second.next_before, after=None, size=2)
    assert [p.id for p in last.results] == mine[:1]
    assert last.next_before is None
    back = await records.page("key-a", before=None, after=last.previous_after, size=2)
    assert [p.id for p in back.results] == mine[2:0:-1]
    assert (await records.page("key-c", before=None, after=None, size=2)).results == []


async def test_a_cancel_request_reaches_the_runner_through_the_database(
    sessionmaker: async_sessionmaker[AsyncSession], runtime: ModelRuntime
) -> None:
    records = PredictionRecords(sessionmaker)
    running, other = await add(records), await add(records)
    assert not await records.request_cancel(running, "key-b"), "another key cannot cancel it"
    assert await records.request_cancel(running, "key-a")
    assert await records.cancels_asked([running, other]) == [running]
    ended = await records.get(other, "key-a")
    assert ended is not None
    ended.conclude("succeeded", generation(runtime))
    await records.finish(ended)
    assert not await records.request_cancel(other, "key-a"), "an ended prediction has nothing to cancel"


async def test_predictions_whose_runner_is_gone_fail(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    records = PredictionRecords(sessionmaker)
    abandoned, alive = await add(records), await add(records)
    async with sessionmaker.begin() as session:
        an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
        await session.execute(
            update(PredictionRecord).where(PredictionRecord.id == abandoned).values(heartbeat_at=an_hour_ago)
        )
    await records.heartbeat(RUNNER, [alive])
    assert await records.fail_orphans(timedelta(minutes=1)) == [abandoned]
    failed = await records.get(abandoned, "key-a")
    assert failed is not None
    assert (failed.status, failed.error, failed.done) == ("failed", RUNNER_GONE, True)
    still = await records.get(alive, "key-a")
    assert still is not None
    assert still.status == "starting"
    assert await records.fail_orphans(timedelta(minutes=1)) == [], "each is failed once"


async def test_ended_predictions_are_purged_after_the_retention(
    sessionmaker: async_sessionmaker[AsyncSession], runtime: ModelRuntime
) -> None:
    records = PredictionRecords(sessionmaker)
    ended, running = await add(records), await add(records)
    stored = await records.get(ended, "key-a")
    assert stored is not None
    stored.conclude("canceled", generation(runtime))
    await records.finish(stored)
    assert await records.purge(timedelta(hours=1)) == 0, "still within the retention"
    assert await records.purge(timedelta(seconds=-1)) == 1
    assert await records.get(ended, "key-a") is None
    assert await records.get(running, "key-a") is not None
