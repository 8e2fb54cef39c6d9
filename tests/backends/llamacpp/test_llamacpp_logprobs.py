"""Log-probabilities from the llama.cpp backend, checked against llama-cpp-python's own logits.

The reference loads the same F16 weights with ``logits_all=True`` and log-softmaxes each
position's raw logits; the backend must report the same values (the sampler's temperature and
truncation never enter them), renormalised over the grammar's allowed tokens when constrained.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llguidance import LLMatcher
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from numpy.typing import NDArray

from backends.base import Constraint, TokenDelta, TokenLogprob
from backends.distributions import logsumexp
from backends.llamacpp.backend import LlamaCppBackend
from backends.llamacpp.grammar import GrammarTokenizer
from backends.llamacpp.pieces import TokenPieces
from gateway.serving.tokenizers import GGUFTokenizer
from tests.backends.llamacpp.backend_support import chat_ids, embedded_config, generate, ids, text
from tests.support.embedded import embedded_f16_path, shared_data_dir

TOLERANCE = 1e-3
REFERENCE_CONTEXT = 256


class Reference:
    """The embedded model through llama-cpp-python with every position's logits kept."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self._pieces = TokenPieces(llama._model.vocab)

    def raw_logits(self, prompt: Sequence[int], reply: Sequence[int] = ()) -> NDArray[np.float64]:
        """Row i: the logits that predict the token after ``(prompt + reply)[: i + 1]``.

        The prompt is evaluated at once and the reply token by token, as the backend does: the
        engine's kernels for one token and for many sum in different orders.
        """
        self.llama.reset()
        self.llama.eval(list(prompt))
        for token in reply:
            self.llama.eval([token])
        return np.array(self.llama.scores[: len(prompt) + len(reply)], dtype=np.float64)

    def piece(self, token: int) -> bytes:
        return self._pieces.text(token)

    def entry(self, row: NDArray[np.float64], token: int, top: int) -> tuple[bytes, float, list[tuple[bytes, float]]]:
        """What the backend should report for ``token`` drawn from logits ``row`` (-inf: not allowed)."""
        logprobs = row - logsumexp(row.astype(np.float32))
        finite = np.flatnonzero(np.isfinite(logprobs))
        order = finite[np.lexsort((finite, -logprobs[finite]))][:top]
        return self.piece(token), float(logprobs[token]), [(self.piece(int(i)), float(logprobs[i])) for i in order]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    from llama_cpp import Llama

    from backends.llamacpp.log_routing import route_llama_cpp_logs

    route_llama_cpp_logs()
    path = embedded_f16_path(shared_data_dir(tmp_path_factory))
    llama = Llama(model_path=str(path), n_ctx=REFERENCE_CONTEXT, logits_all=True, verbose=False)
    try:
        yield Reference(llama)
    finally:
        llama.close()


@pytest.fixture(scope="module")
async def chunked(weights_dir: Path) -> AsyncIterator[LlamaCppBackend]:
    """The embedded model evaluating prompts 8 tokens at a time, so a prompt spans several chunks."""
    backend = LlamaCppBackend(embedded_config(n_batch=8), weights_dir=weights_dir)
    await backend.start()
    yield backend
    await backend.stop()


def entries(deltas: list[TokenDelta]) -> list[TokenLogprob]:
    return [entry for delta in deltas for entry in delta.logprobs]


def assert_matches(actual: TokenLogprob, expected: tuple[bytes, float, list[tuple[bytes, float]]]) -> None:
    token_bytes, logprob, top = expected
    assert actual.token_bytes == token_bytes
    assert actual.logprob is not None
    assert actual.logprob == pytest.approx(logprob, abs=TOLERANCE)
    assert len(actual.top) == len(top)
    # Values rank by rank; tokens wherever they are clearly inside the top (near-ties may swap).
    for (_, value), (_, wanted) in zip(actual.top, top, strict=True):
        assert value == pytest.approx(wanted, abs=TOLERANCE)
    boundary = top[-1][1] + TOLERANCE if top else math.inf
    for piece, value in actual.top:
        if value > boundary:
            assert any(piece == p and abs(value - v) < TOLERANCE for p, v in top), (piece, value, top)
    values = [value for _, value in actual.top]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(value) for value in values) <= 1 + 1e-6


def assert_aligned(deltas: list[TokenDelta]) -> None:
    for delta in deltas:
        assert [entry.token_id for entry in delta.logprobs] == list(delta.token_ids)


async def test_a_greedy_reply_reports_llama_cpp_logprobs(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer, reference: Reference
) -> None:
    prompt = chat_ids(vocab, "What is the capital of France?")
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=24, logprobs=5)
    assert_aligned(deltas)
    reply = ids(deltas)
    rows = reference.raw_logits(prompt, reply)
    for i, (entry, token) in enumerate(zip(entries(deltas), reply, strict=True)):
        assert_matches(entry, reference.entry(rows[len(prompt) - 1 + i], token, 5))
        assert entry.top[0] == (entry.token_bytes, entry.logprob), "the greedy token is the most likely one"
    assert all(delta.prompt_logprobs == () for delta in deltas)


async def test_values_come_before_temperature_and_truncation(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer, reference: Reference
) -> None:
    prompt = chat_ids(vocab, "Tell me a story about a dragon.")
    deltas = await generate(
        smollm, prompt, temperature=1.7, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=7, max_tokens=16, logprobs=3
    )
    reply = ids(deltas)
    rows = reference.raw_logits(prompt, reply)
    for i, (entry, token) in enumerate(zip(entries(deltas), reply, strict=True)):
        assert_matches(entry, reference.entry(rows[len(prompt) - 1 + i], token, 3))


async def test_logit_bias_is_part_of_the_distribution(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer, reference: Reference
) -> None:
    prompt = chat_ids(vocab, "What is the capital of France?")
    [banana] = vocab.encode(" banana")
    bias = {banana: 12.0}
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=4, logprobs=2, logit_bias=bias)
    reply = ids(deltas)
    rows = reference.raw_logits(prompt, reply)
    rows[:, banana] += bias[banana]
    for i, (entry, token) in enumerate(zip(entries(deltas), reply, strict=True)):
        assert_matches(entry, reference.entry(rows[len(prompt) - 1 + i], token, 2))


async def test_a_constraint_renormalises_over_the_allowed_tokens(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer, reference: Reference
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}, "country": {"enum": ["France", "Italy", "Spain"]}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    prompt = chat_ids(vocab, "Name a European capital and its country, as JSON.")
    deltas = await generate(
        smollm, prompt, temperature=0, max_tokens=60, logprobs=5, constraint=Constraint(grammar, {})
    )
    assert deltas[-1].finish_reason == "stop"
    assert_aligned(deltas)
    reply = ids(deltas)
    rows = reference.raw_logits(prompt, reply)
    matcher = LLMatcher(GrammarTokenizer().get(reference.llama._model.vocab), grammar)
    bitmask = allocate_token_bitmask(1, rows.shape[1])
    forced = 0
    for i, (entry, token) in enumerate(zip(entries(deltas), reply, strict=True)):
        fill_next_token_bitmask(matcher, bitmask)
        allowed = np.unpackbits(bitmask.view(np.uint8), count=rows.shape[1], bitorder="little").astype(bool)
        row = np.where(allowed, rows[len(prompt) - 1 + i], -np.inf)
        assert_matches(entry, reference.entry(row, token, 5))
        allowed_pieces = {reference.piece(int(a)) for a in np.flatnonzero(allowed)}
        assert all(piece in allowed_pieces for piece, _ in entry.top)
        if allowed.sum() == 1:
            forced += 1
            assert entry.logprob == 0.0
            assert entry.top == ((entry.token_bytes, 0.0),)
        assert matcher.consume_token(token)
    assert forced, "the schema's punctuation is forced"


async def test_prompt_logprobs_match_llama_cpp_across_chunks(
    chunked: LlamaCppBackend, vocab: GGUFTokenizer, reference: Reference
) -> None:
    prompt = chat_ids(vocab, "Write two sentences about the history of Paris, the capital city of France.")
    assert len(prompt) > 2 * 8
    plain = await generate(chunked, prompt, temperature=0, max_tokens=8)
    deltas = await generate(chunked, prompt, temperature=0, max_tokens=8, prompt_logprobs=3)
    scored = deltas[0].prompt_logprobs
    assert len(scored) == len(prompt)
    assert all(delta.prompt_logprobs == () for delta in deltas[1:])
    assert all(delta.logprobs == () for delta in deltas), "no reply logprobs were asked for"
    assert scored[0] == TokenLogprob(reference.piece(prompt[0]), None, (), prompt[0])
    rows = reference.raw_logits(prompt)
    for i in range(1, len(prompt)):
        assert scored[i].token_id == prompt[i]
        assert_matches(scored[i], reference.entry(rows[i - 1], prompt[i], 3))
    # Sampling goes on from the scored prompt, and the cache it leaves is reused correctly.
    assert ids(deltas) == ids(plain)
    assert ids(await generate(chunked, prompt, temperature=0, max_tokens=8)) == ids(plain)
    both = await generate(chunked, prompt, temperature=0, max_tokens=8, prompt_logprobs=0, logprobs=0)
    assert ids(both) == ids(plain)
    assert all(entry.top == () for entry in both[0].prompt_logprobs + tuple(entries(both)))


async def test_nothing_is_reported_unless_asked(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    deltas = await generate(smollm, chat_ids(vocab, "Hello!"), temperature=0, max_tokens=8)
    assert all(delta.logprobs == () and delta.prompt_logprobs == () for delta in deltas)


# Four-byte characters: SmolLM2's byte-level vocabulary spells each over two or more tokens.
PARROTS = "🦜🐉🦜🐉🦜🐉🦜🐉"


async def test_tokens_held_for_a_character_keep_their_logprobs(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, f"Repeat exactly, with nothing else: {PARROTS}")
    deltas = await generate(smollm, prompt, temperature=0, max_tokens=40, logprobs=0)
    assert_aligned(deltas)
    assert any(len(delta.token_ids) > 1 for delta in deltas)
    assert all(entry.top == () for entry in entries(deltas))
    # A byte-level vocabulary: the tokens' bytes spell the reply.
    assert b"".join(entry.token_bytes for entry in entries(deltas)).decode("utf-8", "replace") == text(deltas)
