"""The llama.cpp backend driven directly, on the bundled SmolLM2 GGUF and the tiny random Llama 2."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import BackendUnavailable, GenerationRequest, SamplingParams, TokenDelta
from backends.llamacpp import LlamaCppBackend
from gateway.settings import ModelConfig, embedded_model_path
from gateway.tokenizers import GGUFTokenizer, SentencePieceTokenizer

CONTEXT = 1024


def config(path: Path, **changes: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "name": "model",
        "backend": "llamacpp",
        "path": str(path),
        "context_length": CONTEXT,
        "options": {"n_ctx": CONTEXT},
    }
    return ModelConfig(**(fields | changes))


@pytest.fixture(scope="module")
async def smollm() -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(config(embedded_model_path()))
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
async def tiny(tiny_model_dir: Path) -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend(config(tiny_model_dir / "model.gguf"))
    await backend.start()
    yield backend
    await backend.stop()


@pytest.fixture(scope="module")
def vocab() -> GGUFTokenizer:
    return GGUFTokenizer.from_file(embedded_model_path())


def chat_ids(vocab: GGUFTokenizer, text: str) -> list[int]:
    """SmolLM2's chat format around one user message."""
    return vocab.encode_with_special(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


async def generate(backend: LlamaCppBackend, prompt: list[int], **sampling: Any) -> list[TokenDelta]:
    sampling.setdefault("max_tokens", 16)
    request = GenerationRequest("test", prompt, SamplingParams(**sampling))
    return [delta async for delta in backend.generate(request)]


def ids(deltas: list[TokenDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text(deltas: list[TokenDelta]) -> str:
    return "".join(delta.text for delta in deltas)


async def test_greedy_answer_and_token_accounting(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    deltas = await generate(smollm, chat_ids(vocab, "What is the capital of France?"), temperature=0, max_tokens=32)
    assert "Paris" in text(deltas)
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


async def test_multibyte_characters_are_never_split(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Write three emoji that show happiness.")
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=40)
    tokens = ids(deltas)
    partial = [token for token in tokens if "\ufffd" in vocab.decode([token])]
    assert partial, "the reply should hold characters spread over several tokens"
    assert all("\ufffd" not in d.text for d in deltas)
    assert all(d.text for d in deltas if d.finish_reason is None), "a delta carries text or waits"
    assert text(deltas) == vocab.decode(tokens)


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
    deltas = await generate(smollm, chat_ids(vocab, "What is the capital of France?"), temperature=0, max_tokens=32)
    assert "Paris" in text(deltas)


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
