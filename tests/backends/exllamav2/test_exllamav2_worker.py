"""The generator thread, driven through `ExLlamaV2Backend` by a stand-in for exllamav2 0.3.2's
dynamic generator: streaming, counting, cancellation, failures, and loading by the options."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from backends.base import BackendUnavailable, GenerationFailed, GenerationRequest, SamplingParams, TokenDelta
from backends.config import BackendConfig
from backends.exllamav2 import ExLlamaV2Backend, engine
from tests.backends.exllamav2.fake_engine import EOS, FakeGenerator, assert_one_sentence, fake_engine, ids_of


async def started(model_dir: Path, **options: Any) -> ExLlamaV2Backend:
    backend = ExLlamaV2Backend(
        BackendConfig(name="llama-2-70b-chat", path=str(model_dir), context_length=4096, max_concurrency=4,
                      options=options)
    )  # fmt: skip
    await backend.start()
    return backend


def request(prompt: list[int], **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_ids=prompt, sampling=SamplingParams(**sampling))


async def collect(backend: ExLlamaV2Backend, req: GenerationRequest) -> list[TokenDelta]:
    return [delta async for delta in backend.generate(req)]


async def test_stream_text_and_counts(calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any) -> None:
    FakeGenerator.script = [*ids_of(hf_tokenizer, "Paris costs 5 €, café 🦙."), EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1, 518, 25580], max_tokens=50, temperature=0.0, seed=3))
    finally:
        await backend.stop()
    completion = [t for d in deltas for t in d.token_ids]
    assert completion == FakeGenerator.script[:-1], "EOS is not a completion token"
    assert "".join(d.text for d in deltas) == "Paris costs 5 €, café 🦙."
    assert [d.finish_reason for d in deltas][-1] == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    job = FakeGenerator.instances[0].enqueued[0]
    assert job.input_ids.values == [1, 518, 25580]
    assert (job.max_new_tokens, job.min_new_tokens, job.seed, job.stop_tokens) == (50, 0, 3, {EOS})
    assert job.decode_special_tokens is False
    assert job.gen_settings.top_k == 1
    assert job.gen_settings.token_repetition_penalty == 1.0
    assert ("unload",) in calls


async def test_held_character_is_counted_when_eos_follows(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    euro = [hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    FakeGenerator.script = [*ids_of(hf_tokenizer, "costs"), *euro[:2], EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=50))
    finally:
        await backend.stop()
    assert [t for d in deltas for t in d.token_ids] == FakeGenerator.script[:-1]
    assert "".join(d.text for d in deltas) == "costs\ufffd\ufffd"
    assert deltas[-1].finish_reason == "stop"


async def test_tokens_exllamav2_holds_back_are_delivered_at_once(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    # A lone lead byte that never completes a character: exllamav2 releases no token, possibly for
    # thousands of steps. The ids are read from the job as they are sampled, so every one is
    # delivered (and billed, a cancellation mid-hold included); only their text waits.
    costs = ids_of(hf_tokenizer, "costs")
    lead = hf_tokenizer.token_to_id("<0xE2>")
    FakeGenerator.script = [*costs, *[lead] * 200, EOS]
    backend = await started(model_dir)
    try:
        stream = backend.generate(request([1], max_tokens=3000))
        deltas: list[TokenDelta] = []
        async for delta in stream:
            deltas.append(delta)
            if sum(d.tokens for d in deltas) >= len(costs) + 20:
                break
        await stream.aclose()
        job = FakeGenerator.instances[0].enqueued[0]
    finally:
        await backend.stop()
    assert "".join(d.text for d in deltas) == "costs"
    assert [t for d in deltas for t in d.token_ids] == [*costs, *[lead] * 20]
    assert sum(d.tokens for d in deltas) == len(costs) + 20
    assert job.new_tokens >= len(costs) + 20


async def test_held_tokens_released_at_eos_are_not_counted_twice(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    lead = hf_tokenizer.token_to_id("<0xE2>")
    FakeGenerator.script = [*ids_of(hf_tokenizer, "costs"), *[lead] * 7, EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=50))
    finally:
        await backend.stop()
    assert [t for d in deltas for t in d.token_ids] == FakeGenerator.script[:-1]
    assert sum(d.tokens for d in deltas) == len(FakeGenerator.script) - 1  # EOS not counted
    assert deltas[-1].finish_reason == "stop"


async def test_length_and_min_tokens(calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any) -> None:
    FakeGenerator.script = [EOS, *ids_of(hf_tokenizer, "a b c d e f g h"), EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=4, min_tokens=2))
    finally:
        await backend.stop()
    completion = [t for d in deltas for t in d.token_ids]
    assert len(completion) == 4
    assert EOS not in completion
    assert deltas[-1].finish_reason == "length"
    assert FakeGenerator.instances[0].enqueued[0].min_new_tokens == 2


async def test_closing_the_stream_cancels_the_job(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [29871, -1]  # endless
    backend = await started(model_dir)
    try:
        stream = backend.generate(request([1], max_tokens=3000))
        assert isinstance(stream, AsyncGenerator)
        received = 0
        async for _delta in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        generator = FakeGenerator.instances[0]
        for _ in range(200):
            if generator.cancelled:
                break
            await asyncio.sleep(0.005)
        assert generator.cancelled == generator.enqueued
        assert generator.num_remaining_jobs() == 0
        FakeGenerator.script = [29871, EOS]
        follow_up = await asyncio.wait_for(collect(backend, request([1], max_tokens=10)), timeout=5)
        assert follow_up[-1].finish_reason == "stop"
    finally:
        await backend.stop()


async def test_engine_failure_fails_the_requests_and_serving_goes_on(
    calls: list[tuple[Any, ...]], model_dir: Path
) -> None:
    FakeGenerator.script = [450, EOS]
    backend = await started(model_dir)
    try:
        FakeGenerator.failures.append(RuntimeError("CUDA error: an illegal memory access\nstack"))
        with pytest.raises(GenerationFailed, match="the engine failed: RuntimeError: CUDA error") as caught:
            await collect(backend, request([1], max_tokens=5))
        assert "\n" not in str(caught.value)
        assert (await collect(backend, request([1], max_tokens=5)))[-1].finish_reason == "stop"
    finally:
        FakeGenerator.failures.clear()
        await backend.stop()


async def test_stop_fails_requests_in_flight(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, -1]  # endless
    backend = await started(model_dir)
    stream = backend.generate(request([1], max_tokens=3000))
    first = await anext(stream)
    assert first.token_ids == (450,)
    await backend.stop()
    with pytest.raises(GenerationFailed, match="the model was stopped"):
        async for _delta in stream:
            pass
    with pytest.raises(BackendUnavailable, match="is not started"):
        await collect(backend, request([1], max_tokens=1))


async def test_concurrent_requests_all_complete(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, 4996, 17354, EOS]
    backend = await started(model_dir)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(backend, request([1, i + 10], max_tokens=20)) for i in range(4))),
            timeout=10,
        )
    finally:
        await backend.stop()
    for deltas in results:
        assert [t for d in deltas for t in d.token_ids] == [450, 4996, 17354]
        assert deltas[-1].finish_reason == "stop"


async def test_logit_bias_becomes_a_padded_tensor(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, EOS]
    backend = await started(model_dir)
    try:
        await collect(backend, request([1], max_tokens=5, logit_bias={29871: -100.0, 3: 2.5}))
        with pytest.raises(GenerationFailed, match="outside the vocabulary"):
            await collect(backend, request([1], max_tokens=5, logit_bias={40000: 1.0}))
    finally:
        await backend.stop()
    bias = FakeGenerator.instances[0].enqueued[0].gen_settings.token_bias
    assert len(bias.values) == 32000
    assert bias.values[29871] == -100.0
    assert bias.values[3] == 2.5


async def test_requests_beyond_max_seq_len_fail_clearly(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    backend = await started(model_dir, max_seq_len=1024)
    try:
        with pytest.raises(GenerationFailed, match="1000 prompt tokens \\+ 100 new tokens exceed max_seq_len 1024"):
            await collect(backend, request([1] * 1000, max_tokens=100))
    finally:
        await backend.stop()


async def test_unpaged_mode_runs_one_sequence(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    backend = await started(model_dir, max_batch_size=8)
    await backend.stop()
    generator = FakeGenerator.instances[0]
    assert generator.paged is False
    assert generator.max_batch_size == 1
    assert generator.warmed_up
    assert backend.capabilities.max_concurrency == 1
    assert ("cache", "ExLlamaV2Cache", 4096, True) in calls, "unpaged: the cache holds one sequence"


async def test_paged_mode_batches(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    recorded: list[tuple[Any, ...]] = []
    monkeypatch.setattr(engine, "import_engine", lambda name: fake_engine(recorded, paged_attention=True))
    FakeGenerator.instances.clear()
    backend = await started(model_dir, max_batch_size=8, cache_mode="q4")
    await backend.stop()
    generator = FakeGenerator.instances[0]
    assert generator.paged is True
    assert generator.max_batch_size == 8
    assert backend.capabilities.max_concurrency == 8
    assert ("cache", "ExLlamaV2Cache_Q4", 4096 * 8, True) in recorded


async def test_paged_requested_without_flash_attn(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"paged: true needs flash-attn >= 2\.5\.7") as caught:
        await started(model_dir, paged=True)
    assert_one_sentence(caught.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [("cache", "ExLlamaV2Cache", 4096, True), ("load_autosplit", "ExLlamaV2Cache", True, None)]),
        (
            {"reserve_vram_gb": [1, 0.5], "cache_mode": "q8"},
            [("cache", "ExLlamaV2Cache_Q8", 4096, True),
             ("load_autosplit", "ExLlamaV2Cache_Q8", True, [1024**3, 512 * 1024**2])],
        ),
        (
            {"gpu_split": [20, 24], "cache_mode": "q4"},
            [("load", [20.0, 24.0]), ("cache", "ExLlamaV2Cache_Q4", 4096, False)],
        ),
        (
            {"autosplit": False, "cache_mode": "q6"},
            [("load", None), ("cache", "ExLlamaV2Cache_Q6", 4096, False)],
        ),
        (
            {"tensor_parallel": True, "gpu_split": [40, 40], "cache_mode": "q4"},
            [("load_tp", [40.0, 40.0], 4096, "ExLlamaV2Cache_Q4"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache_Q4", 4096)],
        ),
        (
            {"tensor_parallel": True, "reserve_vram_gb": 2},
            [("load_tp", [28.0, 28.0], 4096, "ExLlamaV2Cache"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache", 4096)],
        ),
        (
            {"tensor_parallel": True},
            [("load_tp", None, 4096, "ExLlamaV2Cache"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache", 4096)],
        ),
    ],
)  # fmt: skip
async def test_loading_follows_the_options(
    calls: list[tuple[Any, ...]], model_dir: Path, options: dict[str, Any], expected: list[tuple[Any, ...]]
) -> None:
    backend = await started(model_dir, **options)
    await backend.stop()
    assert calls == [*expected, ("unload",)]
