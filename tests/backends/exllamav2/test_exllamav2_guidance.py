"""Constraints and logprobs on exllamav2: the llguidance-driven guide on the CPU (the Llama 2
tokenizer.json), and the generator thread feeding it through the stand-in's filter calls."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, apply_token_bitmask_inplace, fill_next_token_bitmask

from backends.base import Constraint, GenerationRequest, SamplingParams, TokenDelta
from backends.config import BackendConfig
from backends.distributions import allowed_tokens
from backends.exllamav2 import ExLlamaV2Backend
from backends.exllamav2.guidance import TokenGuide, grammar_tokenizer
from tests.backends.exllamav2.fake_engine import (
    EOS,
    PADDED_VOCAB_SIZE,
    SCRIPTED_LOGIT,
    VOCAB_SIZE,
    FakeGenerator,
    ids_of,
)


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_dir: Path) -> LLTokenizer:
    return grammar_tokenizer(llama2_tokenizer_dir / "tokenizer.json", VOCAB_SIZE, EOS)


def yes_or_no() -> str:
    return LLMatcher.grammar_from_regex("(yes|no)")


def test_allowed_tokens_agree_with_llguidance_own_masking(tokenizer: LLTokenizer) -> None:
    matcher = LLMatcher(tokenizer, LLMatcher.grammar_from_json_schema({"type": "object"}))
    bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
    for token in tokenizer.tokenize_str('{"a'):
        fill_next_token_bitmask(matcher, bitmask)
        logits = np.zeros((1, VOCAB_SIZE), dtype=np.float32)
        apply_token_bitmask_inplace(logits, bitmask)
        assert (allowed_tokens(bitmask, VOCAB_SIZE) == np.isfinite(logits[0])).all()
        assert matcher.consume_token(token)


def test_the_guide_masks_rows_in_place(tokenizer: LLTokenizer) -> None:
    guide = TokenGuide(tokenizer, yes_or_no())
    guide.begin()
    row = np.zeros(PADDED_VOCAB_SIZE, dtype=np.float32)
    guide.prepare()
    guide.mask(row)
    allowed = np.flatnonzero(np.isfinite(row))
    assert allowed.size
    assert all(b"yes".startswith(p) or b"no".startswith(p) for p in (guide.piece(int(t)) for t in allowed))
    assert not np.isfinite(row[VOCAB_SIZE:]).any(), "the head's padding is never sampled"
    for token in tokenizer.tokenize_str("yes"):
        guide.feed(token)
    row = np.zeros(PADDED_VOCAB_SIZE, dtype=np.float32)
    guide.prepare()
    guide.mask(row)
    assert np.flatnonzero(np.isfinite(row)).tolist() == [EOS], "a complete grammar allows only EOS"


def test_the_set_based_step_allows_what_the_mask_allows(tokenizer: LLTokenizer) -> None:
    guide = TokenGuide(tokenizer, yes_or_no())
    guide.begin()
    row = np.zeros(PADDED_VOCAB_SIZE, dtype=np.float32)
    guide.prepare()
    guide.mask(row)
    allowed, ending = guide.allowed()
    assert allowed == {int(t) for t in np.flatnonzero(np.isfinite(row))}
    assert ending == set()  # nothing written yet: the reply cannot end
    for token in tokenizer.tokenize_str("yes"):
        guide.feed(token)
    allowed, ending = guide.allowed()
    assert allowed == ending == {EOS}
    assert TokenGuide(tokenizer, None, top_logprobs=2).allowed() == (None, None)


def test_the_guide_records_logprobs_of_fed_tokens(tokenizer: LLTokenizer) -> None:
    guide = TokenGuide(tokenizer, top_logprobs=2)
    [paris] = tokenizer.tokenize_str(" Paris")
    for token in (paris, EOS):
        row = np.zeros(PADDED_VOCAB_SIZE, dtype=np.float32)
        row[token] = 3.0
        row[7] = 1.0
        row[EOS if token != EOS else 5] = -1e30  # exllamav2's ban on stop tokens
        guide.prepare()
        guide.mask(row)
        guide.feed(token)
    [entry] = guide.take(1)
    lse = math.log(math.exp(3.0) + math.exp(1.0) + (VOCAB_SIZE - 3))
    assert entry.token_id == paris
    assert entry.token_bytes == b" Paris"
    assert entry.logprob == pytest.approx(3.0 - lse)
    assert [piece for piece, _ in entry.top] == [b" Paris", guide.piece(7)]
    assert [value for _, value in entry.top] == pytest.approx([3.0 - lse, 1.0 - lse])
    assert guide.piece(EOS) == b"", "special tokens add no text"
    # The stop token's entry stays behind: nobody takes it.
    assert len(guide.take(5)) == 1


# The generator thread, with the stand-in sampling through the job's filters.


async def started(model_dir: Path) -> ExLlamaV2Backend:
    backend = ExLlamaV2Backend(
        BackendConfig(name="llama-2-70b-chat", path=str(model_dir), context_length=4096, max_concurrency=4)
    )
    await backend.start()
    return backend


async def generate(model_dir: Path, request: GenerationRequest) -> list[TokenDelta]:
    backend = await started(model_dir)
    try:
        assert backend.capabilities.supports_constraints
        assert backend.capabilities.supports_logprobs
        assert not backend.capabilities.supports_prompt_logprobs
        return [delta async for delta in backend.generate(request)]
    finally:
        await backend.stop()


async def test_a_constrained_job_stays_in_its_grammar(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    FakeGenerator.script = [*ids_of(hf_tokenizer, "Paris is lovely"), EOS]
    sampling = SamplingParams(max_tokens=20, min_tokens=10)
    request = GenerationRequest("r", [1, 518], sampling, constraint=Constraint(yes_or_no(), {}))
    deltas = await generate(model_dir, request)
    text = "".join(delta.text for delta in deltas)
    assert text in {"yes", "no"}
    assert deltas[-1].finish_reason == "stop", "once complete, the grammar allows EOS only: it wins over min_tokens"
    assert EOS not in [t for d in deltas for t in d.token_ids]
    [job] = FakeGenerator.instances[0].enqueued
    assert len(job.filters) == 1


async def test_logprobs_follow_the_released_tokens(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    script = ids_of(hf_tokenizer, "Paris costs 5 €.")
    FakeGenerator.script = [*script, EOS]
    request = GenerationRequest("r", [1, 518], SamplingParams(max_tokens=50), logprobs=1)
    deltas = await generate(model_dir, request)
    lse = math.log(math.exp(SCRIPTED_LOGIT) + VOCAB_SIZE - 1)
    for delta in deltas:
        assert [entry.token_id for entry in delta.logprobs] == list(delta.token_ids)
    entries = [entry for delta in deltas for entry in delta.logprobs]
    assert [entry.token_id for entry in entries] == script, "the stop token has no entry"
    for entry in entries:
        assert entry.logprob == pytest.approx(SCRIPTED_LOGIT - lse)
        assert entry.top == ((entry.token_bytes, entry.logprob),)
    assert b"".join(entry.token_bytes for entry in entries).decode() == " Paris costs 5 €."


async def test_plain_jobs_have_no_filter(calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any) -> None:
    FakeGenerator.script = [*ids_of(hf_tokenizer, "Paris"), EOS]
    deltas = await generate(model_dir, GenerationRequest("r", [1], SamplingParams(max_tokens=5)))
    assert all(delta.logprobs == () for delta in deltas)
    [job] = FakeGenerator.instances[0].enqueued
    assert job.filters == []
