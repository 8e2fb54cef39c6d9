"""Frames between the gateway and an engine process carry every field of the backend protocol."""

from __future__ import annotations

import asyncio
import struct

import pytest

from backends.base import (
    BackendCapabilities,
    BackendError,
    BackendUnavailable,
    Constraint,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    SamplingParams,
    TokenDelta,
    TokenLogprob,
)
from backends.config import BackendConfig
from backends.engine_process.wire import (
    MAX_FRAME_BYTES,
    Cancel,
    Delta,
    EngineSpec,
    FrameError,
    Generate,
    Ready,
    Shutdown,
    decode_spec,
    encode_spec,
    failed,
    failure_error,
    frame,
    read_from_engine,
    read_to_engine,
)


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_a_request_with_every_field_arrives_whole() -> None:
    request = GenerationRequest(
        "req-1",
        list(range(5000)),
        SamplingParams(
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.2,
            frequency_penalty=-0.3,
            seed=2**63 - 1,
            min_tokens=2,
            logit_bias={13: -100.0, 2: 5.5},
        ),
        continuation=True,
        constraint=Constraint('{"grammars": []}', {"guided_json": {"type": "object"}}, param="response_format"),
        logprobs=5,
        prompt_logprobs=0,
    )
    reader = reader_of(frame(Generate(3, request)) + frame(Cancel(3)) + frame(Shutdown()))
    generate = await read_to_engine(reader)
    assert isinstance(generate, Generate)
    assert generate.id == 3
    assert generate.request.sampling == request.sampling
    assert dict(generate.request.sampling.logit_bias) == {13: -100.0, 2: 5.5}
    assert list(generate.request.prompt_ids) == list(range(5000))
    assert generate.request.constraint == request.constraint
    assert (generate.request.continuation, generate.request.logprobs, generate.request.prompt_logprobs) == (True, 5, 0)
    assert await read_to_engine(reader) == Cancel(3)
    assert await read_to_engine(reader) == Shutdown()
    assert await read_to_engine(reader) is None


async def test_a_delta_keeps_its_bytes_logprobs_and_counts() -> None:
    entry = TokenLogprob(b"\xe2\x82", -0.25, ((b"\xe2\x82", -0.25), (b" the", -1.5)), token_id=1234)
    delta = TokenDelta(
        "", (1234,), None, token_count=3, logprobs=(entry,), prompt_logprobs=(TokenLogprob(b"<s>", None),)
    )
    capabilities = BackendCapabilities(8, 4096, supports_constraints=True, supports_logprobs=True)
    reader = reader_of(frame(Ready(capabilities, 42)) + frame(Delta(9, delta)))
    assert await read_from_engine(reader) == Ready(capabilities, 42)
    received = await read_from_engine(reader)
    assert isinstance(received, Delta)
    assert received.delta == delta
    assert received.delta.tokens == 3


@pytest.mark.parametrize(
    "error", [GrammarRejected("empty"), GenerationFailed("died"), BackendUnavailable("not loaded"), BackendError("x")]
)
def test_a_failure_is_raised_as_the_same_error(error: BackendError) -> None:
    rebuilt = failure_error(failed(1, error))
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)


def test_a_subclass_the_gateway_does_not_know_is_sent_as_its_nearest_known_error() -> None:
    class OutOfMemory(GenerationFailed):
        pass

    rebuilt = failure_error(failed(1, OutOfMemory("CUDA out of memory")))
    assert type(rebuilt) is GenerationFailed


async def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    reader = reader_of(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(FrameError, match="limit"):
        await read_from_engine(reader)


@pytest.mark.parametrize("cut", [2, 6])
async def test_a_stream_cut_inside_a_frame_is_an_error_not_an_end(cut: int) -> None:
    data = frame(Cancel(1))
    with pytest.raises(FrameError):
        await read_to_engine(reader_of(data[:cut]))


async def test_a_frame_of_the_other_direction_is_refused() -> None:
    with pytest.raises(FrameError):
        await read_to_engine(reader_of(frame(Ready(BackendCapabilities(1, 1), 1))))
    with pytest.raises(FrameError):
        await read_from_engine(reader_of(frame(Shutdown())))


def test_the_spec_carries_the_config_and_its_options() -> None:
    config = BackendConfig("m", "/weights/m.gguf", 2048, 3, {"n_ctx": 2048, "engine_process": False, "x": [1, "a"]})
    spec = decode_spec(encode_spec(EngineSpec("llamacpp", config, "/data/weights")))
    assert spec.kind == "llamacpp"
    assert spec.weights_dir == "/data/weights"
    assert (spec.config.name, spec.config.path, spec.config.context_length, spec.config.max_concurrency) == (
        "m",
        "/weights/m.gguf",
        2048,
        3,
    )
    assert dict(spec.config.options) == {"n_ctx": 2048, "engine_process": False, "x": [1, "a"]}
