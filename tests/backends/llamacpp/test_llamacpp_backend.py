"""The llama.cpp backend driven directly, on the bundled SmolLM2 GGUF and the tiny random Llama 2."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import pytest

from backends.base import BackendUnavailable, GenerationRequest, SamplingParams
from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.tokenizers import GGUFTokenizer, SentencePieceTokenizer
from gateway.settings import embedded_model_path
from tests.backends.llamacpp.backend_support import CONTEXT, chat_ids, config, embedded_config, generate, ids, text
from tests.support.embedded import DirectEngine


async def test_greedy_answer_and_token_accounting(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    deltas = await generate(smollm, chat_ids(vocab, "What is the capital of France?"), temperature=0, max_tokens=32)
    assert "Paris" in text(deltas), "the F16 weights answer simple questions right on every CPU"
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert vocab.eos_id not in ids(deltas), "the EOS that ended generation is not counted"
    assert vocab.decode(ids(deltas)) == text(deltas)
    again = await generate(smollm, chat_ids(vocab, "What is the capital of France?"), temperature=0, max_tokens=32)
    assert ids(again) == ids(deltas)


async def test_max_tokens_finishes_with_length(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    deltas = await generate(smollm, chat_ids(vocab, "Tell me a long story."), temperature=0, max_tokens=7)
    assert len(ids(deltas)) == 7
    assert deltas[-1].finish_reason == "length"


async def test_seeded_sampling_is_reproducible(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Tell me a story about a dragon.")

    async def sample(seed: int) -> list[int]:
        return ids(await generate(smollm, prompt, temperature=1.0, seed=seed, max_tokens=16, min_tokens=16))

    first = await sample(42)
    assert await sample(42) == first
    others = [await sample(seed) for seed in (1, 2, 3)]
    assert any(other != first for other in others)


async def test_prompt_prefix_reuse_does_not_change_output(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    question = chat_ids(vocab, "What is the capital of France?")
    other = chat_ids(vocab, "What is the capital of Italy?")
    first = ids(await generate(smollm, question, temperature=0))
    await generate(smollm, other, temperature=0)  # shares the chat preamble: its cache is reused
    assert ids(await generate(smollm, question, temperature=0)) == first


async def test_min_tokens_bans_eos(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "What is the capital of France?")
    natural = await generate(smollm, prompt, temperature=0, max_tokens=40)
    assert natural[-1].finish_reason == "stop"
    short = len(ids(natural))
    forced = await generate(smollm, prompt, temperature=0, max_tokens=short + 8, min_tokens=short + 8)
    assert forced[-1].finish_reason == "length"
    assert len(ids(forced)) == short + 8
    # Until EOS was due, the banned sampler chose what the plain one would.
    assert ids(forced)[:short] == ids(natural)


async def test_logit_bias(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "What is the capital of France?")
    greedy = ids(await generate(smollm, prompt, temperature=0, max_tokens=3))
    banned = ids(await generate(smollm, prompt, temperature=0, max_tokens=3, logit_bias={greedy[0]: -100}))
    assert banned[0] != greedy[0]
    [banana] = vocab.encode(" banana")
    forced = await generate(smollm, prompt, temperature=0.7, seed=1, max_tokens=3, logit_bias={banana: 100})
    assert ids(forced) == [banana] * 3


async def test_greedy_output_equals_llama_cpp_called_directly(
    smollm: LlamaCppBackend, direct_engine: DirectEngine
) -> None:
    for question in ("What is the capital of France?", "Tell me a story about a dragon."):
        prompt = direct_engine.chat_ids(question)
        deltas = await generate(smollm, prompt, temperature=0, max_tokens=48)
        assert ids(deltas) == direct_engine.greedy(prompt, max_tokens=48)
        assert text(deltas) == direct_engine.decode(ids(deltas))


# Four-byte characters: SmolLM2's byte-level vocabulary spells each over two or more tokens.
PARROTS = "🦜🐉🦜🐉🦜🐉🦜🐉"


async def test_multibyte_characters_are_never_split(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer, direct_engine: DirectEngine
) -> None:
    # A copying task: the reply holds the emoji whatever the CPU, so their bytes arrive in pieces.
    prompt = direct_engine.chat_ids(f"Repeat exactly, with nothing else: {PARROTS}")
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=40)
    tokens = ids(deltas)
    assert tokens == direct_engine.greedy(prompt, max_tokens=40)
    partial = [token for token in tokens if "\ufffd" in vocab.decode([token])]
    assert partial, f"no character of {text(deltas)!r} was split across tokens"
    # Only a reply cut off by max_tokens inside a character ends with U+FFFD, as decoding its ids does.
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert all(d.text for d in deltas if d.finish_reason is None), "a delta carries text or waits"
    assert text(deltas) == vocab.decode(tokens)
    # A delta that held back an incomplete character carries the ids of every token it waited for.
    assert any(len(d.token_ids) > 1 for d in deltas)


async def test_sentencepiece_reply_loses_its_leading_space(tiny: LlamaCppBackend, llama2_tokenizer_dir: Path) -> None:
    sp = SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    prompt = [sp.bos_id, *sp.encode("[INST] Where is the Eiffel tower? [/INST]")]
    [paris] = sp.encode("Paris")
    assert sp.decode([paris]) == "Paris"
    deltas = await generate(tiny, prompt, temperature=0, max_tokens=3, logit_bias={paris: 100})
    assert ids(deltas) == [paris] * 3
    assert text(deltas) == "Paris Paris Paris"


async def test_a_continuation_keeps_its_leading_space(tiny: LlamaCppBackend, llama2_tokenizer_dir: Path) -> None:
    sp = SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    prompt = [sp.bos_id, *sp.encode("The capital of France is")]
    [paris] = sp.encode("Paris")
    sampling = SamplingParams(max_tokens=2, temperature=0, logit_bias={paris: 100})
    request = GenerationRequest("test", prompt, sampling, continuation=True)
    deltas = [delta async for delta in tiny.generate(request)]
    # Legacy completions continue the prompt's text, as vLLM and llama.cpp's server return it.
    assert text(deltas) == " Paris Paris"


async def test_repetition_penalty_covers_the_prompt(tiny: LlamaCppBackend, llama2_tokenizer_dir: Path) -> None:
    sp = SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    [paris] = sp.encode("Paris")
    [rome] = sp.encode("Rome")
    # Paris appears in the prompt only. The biases put both far above every other token (the tiny
    # model's own logits are near zero), Paris one ahead; a penalty of 5 on Paris flips that.
    prompt = [sp.bos_id, *sp.encode("[INST] Name a capital other than Paris. [/INST]")]
    assert paris in prompt
    bias = {paris: 31.0, rome: 30.0}
    plain = await generate(tiny, prompt, temperature=0, max_tokens=1, logit_bias=bias)
    penalised = await generate(tiny, prompt, temperature=0, max_tokens=1, logit_bias=bias, repetition_penalty=5.0)
    assert ids(plain) == [paris]
    assert ids(penalised) == [rome]


async def test_cancellation_frees_the_slot_at_once(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Tell me a long story.")
    request = GenerationRequest("long", prompt, SamplingParams(max_tokens=900, min_tokens=900, temperature=0))
    stream = smollm.generate(request)
    received = [await anext(stream), await anext(stream)]
    assert all(d.finish_reason is None for d in received)
    started = time.monotonic()
    await stream.aclose()
    slots = smollm._slots
    assert slots is not None
    while slots.empty():
        await asyncio.sleep(0.005)
        assert time.monotonic() - started < 1, "the worker thread kept the slot"
    # The slot serves the next request, from a clean state.
    prompt = chat_ids(vocab, "What is the capital of France?")
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=32)
    assert ids(deltas) == ids(await generate(smollm, prompt, temperature=0, max_tokens=32))


async def test_cancelling_the_consuming_task(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    request = GenerationRequest(
        "long", chat_ids(vocab, "Tell me a long story."), SamplingParams(max_tokens=900, min_tokens=900)
    )
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in smollm.generate(request):
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slots = smollm._slots
    assert slots is not None
    started = time.monotonic()
    while slots.empty():
        await asyncio.sleep(0.005)
        assert time.monotonic() - started < 1, "the worker thread kept the slot"


def test_capabilities_and_options(tiny_model_dir: Path) -> None:
    backend = LlamaCppBackend(config(tiny_model_dir / "model.gguf", context_length=4096, max_concurrency=2))
    assert backend.capabilities.context_length == CONTEXT  # n_ctx caps the configured context
    assert backend.capabilities.max_concurrency == 2
    with pytest.raises(BackendUnavailable, match="n_gpu_layers"):
        LlamaCppBackend(config(tiny_model_dir / "model.gguf", options={"n_gpu_layers": 1}))


async def test_missing_weights_fail_to_start(tmp_path: Path) -> None:
    backend = LlamaCppBackend(config(tmp_path / "missing.gguf"))
    with pytest.raises(BackendUnavailable):
        await backend.start()


async def test_generate_before_start_is_unavailable(tiny_model_dir: Path) -> None:
    backend = LlamaCppBackend(config(tiny_model_dir / "model.gguf"))
    with pytest.raises(BackendUnavailable):
        await generate(backend, [1, 2, 3])


async def test_the_stored_quantized_weights_stay_selectable(vocab: GGUFTokenizer, tmp_path: Path) -> None:
    backend = LlamaCppBackend(embedded_config("stored"), weights_dir=tmp_path)
    assert backend.prepare_weights() == embedded_model_path()
    await backend.start()
    try:
        deltas = await generate(backend, chat_ids(vocab, "What is the capital of France?"), temperature=0, max_tokens=8)
    finally:
        await backend.stop()
    assert ids(deltas)
    assert not any(tmp_path.iterdir()), "nothing is converted for the stored format"  # noqa: ASYNC240


def test_a_first_conversion_logs_one_line_with_its_time(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = LlamaCppBackend(embedded_config(), weights_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        path = backend.prepare_weights()
        again = backend.prepare_weights()
    assert path == again
    assert path.parent == tmp_path
    [record] = [r for r in caplog.records if r.name.startswith(("backends", "gguf"))]
    expected = r"converted SmolLM2-135M-Instruct\.Q4_1\.gguf to F16 for llama\.cpp in [0-9.]+ s: .+"
    assert re.fullmatch(expected, record.getMessage())


def test_a_weights_file_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    for compute_format in ("stored", "f16"):
        backend = LlamaCppBackend(embedded_config(compute_format, sha256="ab" * 32), weights_dir=tmp_path)
        with pytest.raises(BackendUnavailable, match="SHA-256"):
            backend.prepare_weights()


def test_compute_format_is_checked() -> None:
    with pytest.raises(BackendUnavailable, match="compute_format must be one of stored, f16, bf16, f32, q8_0"):
        LlamaCppBackend(embedded_config("q2_k"))
    with pytest.raises(BackendUnavailable, match="weights directory"):
        LlamaCppBackend(embedded_config("f16")).preflight()
