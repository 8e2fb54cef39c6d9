"""The openai backend failing over between real workers: a front gateway, worker processes, the SDK.

Workers are ``llama-gateway serve`` processes with a scripted model, and raw servers that fail on
cue. Every client request leaves exactly one usage row in the front's database, whichever
replica served it and however many were tried.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.gateway_process import GatewayProcess, wait_for
from tests.support.live import free_port
from tests.support.raw_http_worker import Worker
from tests.support.replica_workers import (
    WORKER_KEY,
    WORKER_KEY_ENV,
    FirstTokenThenClose,
    base_url,
    front_metric,
    front_model,
    never_answer,
    raw_worker,
    usage_count,
    worker_process,
)
from tests.support.served import Served, serve

MODEL = "remote-chat"
REPLY = "one two three four five"
MESSAGES: list[Any] = [{"role": "user", "content": "Count to five."}]
STATUS_500 = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops"
STATUS_400 = b'HTTP/1.1 400 Bad Request\r\ncontent-length: 15\r\n\r\n{"error": "no"}'
NO_PROBES = 600.0
"""A probe interval no test reaches: the replica stays out of rotation once it is out."""


@pytest.fixture(autouse=True)
def worker_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_KEY_ENV, WORKER_KEY)


@pytest.fixture(scope="module")
def good_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with worker_process(tmp_path_factory.mktemp("good-worker"), REPLY) as worker:
        yield worker


def _front(tmp_path_factory: pytest.TempPathFactory, urls: list[str], **options: Any) -> Any:
    return serve(tmp_path_factory, [front_model(MODEL, urls, **options)])


def _chat(front: Served) -> str:
    """One whole chat completion that must succeed; returns its request id."""
    response = front.client().chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    reply = response.parse()
    assert reply.choices[0].message.content == REPLY
    assert reply.model == MODEL
    return response.headers["x-request-id"]


def _streamed_chat(front: Served) -> str:
    """One streamed chat completion that must succeed; returns its request id."""
    response = front.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(REPLY.split())
    return response.headers["x-request-id"]


def _one_row(front: Served, request_id: str) -> dict[str, Any]:
    front.usage_row(request_id)  # waits for a row written after the response
    rows = front.usage_rows("request_id = ?", request_id)
    assert len(rows) == 1, rows
    return rows[0]


def _skips(front: Served, url: str, reason: str) -> float:
    return front_metric(
        front.live.base_url, "llama_gateway_replica_skips_total", model=MODEL, replica=url, reason=reason
    )


def _in_rotation(front: Served, url: str) -> float:
    return front_metric(front.live.base_url, "llama_gateway_replica_in_rotation", model=MODEL, replica=url)


def test_a_killed_worker_leaves_its_requests_to_the_other_and_is_probed_back_in(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, good_worker: GatewayProcess
) -> None:
    port = free_port()
    doomed_url = f"http://127.0.0.1:{port}/v1"
    with (
        worker_process(tmp_path / "doomed", REPLY, port=port) as doomed,
        _front(tmp_path_factory, [doomed_url, base_url(good_worker)], probe_interval_s=0.2) as front,
    ):
        first = _chat(front)
        assert usage_count(doomed) == 1  # equal load: the first replica listed took it
        served_before = usage_count(good_worker)

        doomed.process.kill()
        doomed.process.wait()
        ids = [_chat(front), _streamed_chat(front), _chat(front)]

        assert usage_count(good_worker) == served_before + 3
        assert _in_rotation(front, doomed_url) == 0
        skipped = sum(_skips(front, doomed_url, reason) for reason in ("connect_error", "disconnected"))
        assert skipped >= 1
        for request_id in [first, *ids]:
            row = _one_row(front, request_id)
            assert (row["model"], row["status"], row["completion_tokens"]) == (MODEL, "completed", 5)

        with worker_process(tmp_path / "revived", REPLY, port=port) as revived:
            wait_for(lambda: _in_rotation(front, doomed_url) == 1, 30, "the revived worker was not probed back in")
            _one_row(front, _streamed_chat(front))
            assert usage_count(revived) == 1


def test_a_worker_answering_500_is_skipped_and_taken_out_of_rotation(
    tmp_path_factory: pytest.TempPathFactory, good_worker: GatewayProcess
) -> None:
    failing = Worker(lambda _: STATUS_500)
    with (
        raw_worker(failing.handle) as failing_url,
        _front(tmp_path_factory, [failing_url, base_url(good_worker)], probe_interval_s=NO_PROBES) as front,
    ):
        ids = [_chat(front), _streamed_chat(front), _chat(front)]
        assert failing.requests == 1  # out of rotation after its one failure
        assert _skips(front, failing_url, "status_5xx") == 1
        assert _in_rotation(front, failing_url) == 0
        for request_id in ids:
            assert _one_row(front, request_id)["status"] == "completed"


def test_a_worker_that_never_answers_is_left_after_the_first_token_timeout(
    tmp_path_factory: pytest.TempPathFactory, good_worker: GatewayProcess
) -> None:
    with (
        raw_worker(never_answer) as silent_url,
        _front(
            tmp_path_factory,
            [silent_url, base_url(good_worker)],
            first_token_timeout_s=0.5,
            probe_interval_s=NO_PROBES,
        ) as front,
    ):
        request_id = _streamed_chat(front)
        assert _skips(front, silent_url, "timeout") == 1
        assert _one_row(front, request_id)["status"] == "completed"


def test_a_failure_after_the_first_token_is_not_retried(
    tmp_path_factory: pytest.TempPathFactory, good_worker: GatewayProcess
) -> None:
    cut = FirstTokenThenClose()
    # Failures after the first token count towards ejection too: a higher bar keeps the replica
    # in rotation for the second request.
    options = {"probe_interval_s": NO_PROBES, "eject_after_failures": 2}
    with (
        raw_worker(cut.handle) as cut_url,
        _front(tmp_path_factory, [cut_url, base_url(good_worker)], **options) as front,
    ):
        served_before = usage_count(good_worker)
        response = front.client().chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, stream=True)
        received: list[str] = []

        def read_stream() -> None:
            for chunk in response.parse():
                received.append(chunk.choices[0].delta.content or "")

        with pytest.raises(openai.APIError, match="failed while generating"):
            read_stream()
        assert "".join(received) == "Hel"  # the client saw a token: the request ends here
        row = _one_row(front, response.headers["x-request-id"])
        assert (row["status"], row["completion_tokens"]) == ("failed", 1)

        with pytest.raises(openai.InternalServerError):
            front.client().chat.completions.create(model=MODEL, messages=MESSAGES)

        assert cut.requests == 2
        assert usage_count(good_worker) == served_before  # neither request was replayed there
        assert [row["status"] for row in front.usage_rows()] == ["failed", "failed"]

        _chat(front)  # the second failure took the replica out: the next request goes elsewhere
        assert _in_rotation(front, cut_url) == 0
        assert cut.requests == 2


def test_a_request_the_worker_refuses_as_invalid_is_not_failed_over(
    tmp_path_factory: pytest.TempPathFactory, good_worker: GatewayProcess
) -> None:
    refusing = Worker(lambda _: STATUS_400)
    with (
        raw_worker(refusing.handle) as refusing_url,
        _front(tmp_path_factory, [refusing_url, base_url(good_worker)], probe_interval_s=NO_PROBES) as front,
    ):
        served_before = usage_count(good_worker)
        with pytest.raises(openai.InternalServerError):
            front.client().chat.completions.create(model=MODEL, messages=MESSAGES)
        assert refusing.requests == 1
        assert usage_count(good_worker) == served_before
        assert _in_rotation(front, refusing_url) == 1
        [row] = front.usage_rows()
        assert (row["status"], row["completion_tokens"]) == ("failed", 0)
