from __future__ import annotations

import asyncio
import json

import pytest
from replicate.stream import EventSource, ServerSentEvent

from backends.base import SamplingParams
from gateway.api.replicate import stream as stream_module
from gateway.api.replicate.predictions import Prediction
from gateway.api.replicate.stream import prediction_events, resume_index, sse_event
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from tests.support.prediction_records import new_prediction


def decode(stream: bytes) -> list[ServerSentEvent]:
    """Events as Replicate's Python client decodes them."""
    decoder = EventSource.Decoder()
    events = []
    for line in stream.decode().split("\n"):
        event = decoder.decode(line)
        if event is not None:
            events.append(event)
    return events


def ended(runtime: ModelRuntime) -> Generation:
    return Generation(runtime, "req_test", [1, 2, 3], SamplingParams(max_tokens=8))


async def collect(prediction: Prediction, start: int = 0) -> bytes:
    return b"".join([chunk async for chunk in prediction_events(prediction, start)])


@pytest.mark.parametrize("piece", ["Hello", " leading space", "two\nlines", "trailing newline\n", "\r\nwindows", ""])
def test_pieces_survive_the_clients_decoder(piece: str) -> None:
    (event,) = decode(sse_event("output", piece, 7))
    assert event.event == ServerSentEvent.EventType.OUTPUT
    assert event.data == piece.replace("\r\n", "\n")
    assert event.id == "7"


async def test_a_finished_prediction_replays_everything_then_done(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    for piece in ("The", " answer", " is", " 42."):
        prediction.append(piece)
    prediction.finish("succeeded", ended(runtime))
    events = decode(await collect(prediction))
    assert [e.data for e in events] == ["The", " answer", " is", " 42.", "{}"]
    assert [e.id for e in events] == ["0", "1", "2", "3", "4"]
    assert events[-1].event == ServerSentEvent.EventType.DONE


async def test_a_late_client_gets_the_pieces_so_far_then_follows(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    prediction.append("early")
    reader = asyncio.create_task(collect(prediction))
    await asyncio.sleep(0.01)
    prediction.append(" later")
    await asyncio.sleep(0.01)
    prediction.append(" last")
    prediction.finish("succeeded", ended(runtime))
    events = decode(await asyncio.wait_for(reader, 5))
    assert [e.data for e in events] == ["early", " later", " last", "{}"]


async def test_resuming_skips_what_the_client_has(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    for piece in ("a", "b", "c"):
        prediction.append(piece)
    prediction.finish("succeeded", ended(runtime))
    events = decode(await collect(prediction, resume_index("1")))
    assert [(e.id, e.data) for e in events] == [("2", "c"), ("3", "{}")]
    assert resume_index(None) == resume_index("junk") == 0


async def test_a_canceled_prediction_says_so_in_done(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    prediction.append("partial")
    prediction.finish("canceled", ended(runtime))
    events = decode(await collect(prediction))
    assert json.loads(events[-1].data) == {"reason": "canceled"}


async def test_a_failed_prediction_sends_error_then_done(runtime: ModelRuntime) -> None:
    prediction = new_prediction()
    prediction.start()
    prediction.finish("failed", ended(runtime), "The model failed while generating; please retry.")
    events = decode(await collect(prediction))
    assert [e.event for e in events] == [ServerSentEvent.EventType.ERROR, ServerSentEvent.EventType.DONE]
    assert json.loads(events[0].data) == {"detail": "The model failed while generating; please retry."}
    assert json.loads(events[1].data) == {"reason": "error"}


async def test_a_quiet_stream_sends_keepalive_comments(runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.api.replicate import stream

    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.01)
    prediction = new_prediction()
    prediction.start()
    chunks = prediction_events(prediction)
    assert await anext(chunks) == b": keepalive\n\n"
    prediction.finish("succeeded", ended(runtime))
    assert decode(b"".join([chunk async for chunk in chunks]))[-1].data == "{}"


async def test_a_prediction_running_elsewhere_is_followed_through_the_database(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.api.replicate import stream

    monkeypatch.setattr(stream, "REMOTE_POLL_S", 0.01)
    seen = new_prediction()
    seen.start()
    seen.append("a")
    stored = [seen]  # what the database holds: the reader's copy, then newer states

    async def reread() -> Prediction | None:
        return stored[-1]

    reader = asyncio.create_task(collect_with(seen, reread))
    newer = new_prediction(id=seen.id)
    newer.start()
    newer.output = ["a", "b"]
    stored.append(newer)
    await asyncio.sleep(0.05)
    final = new_prediction(id=seen.id)
    final.start()
    final.output = ["a", "b", "c"]
    final.finish("succeeded", ended(runtime))
    stored.append(final)
    events = decode(await asyncio.wait_for(reader, 5))
    assert [(e.id, e.data) for e in events] == [("0", "a"), ("1", "b"), ("2", "c"), ("3", "{}")]


async def collect_with(prediction: Prediction, reread: stream_module.Reread) -> bytes:
    return b"".join([chunk async for chunk in prediction_events(prediction, 0, reread)])
