"""Constrained sampling on the llama.cpp backend: every reply matches its grammar, whatever the sampler."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llguidance import LLMatcher

from backends.base import (
    Constraint,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    SamplingParams,
    TokenDelta,
)
from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.tokenizers import GGUFTokenizer, SentencePieceTokenizer
from tests.backends.llamacpp.backend_support import chat_ids, embedded_config, generate, ids, text

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def constraint(grammar: str) -> Constraint:
    return Constraint(grammar, {})


def json_constraint(schema: dict[str, Any]) -> Constraint:
    return constraint(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE))  # type: ignore[arg-type]


def test_the_backend_says_it_supports_constraints_and_logprobs(smollm: LlamaCppBackend) -> None:
    capabilities = smollm.capabilities
    assert capabilities.supports_constraints
    assert capabilities.supports_logprobs
    assert capabilities.supports_prompt_logprobs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_json_schema_replies_parse_and_validate(smollm: LlamaCppBackend, vocab: GGUFTokenizer, seed: int) -> None:
    prompt = chat_ids(vocab, "Describe a user of our website as JSON.")
    person = json_constraint(PERSON)
    deltas = await generate(smollm, prompt, constraint=person, temperature=1.0, seed=seed, max_tokens=300)
    assert deltas[-1].finish_reason == "stop", "the grammar ends the reply once the object is closed"
    reply = json.loads(text(deltas))
    jsonschema.validate(reply, PERSON)
    # Tokens the grammar forced are sampled, counted and decoded like any other.
    assert vocab.eos_id not in ids(deltas)
    assert vocab.decode(ids(deltas)) == text(deltas)
    assert all(delta.tokens == len(delta.token_ids) for delta in deltas)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
async def test_a_regex_allows_exactly_its_words(smollm: LlamaCppBackend, vocab: GGUFTokenizer, seed: int) -> None:
    prompt = chat_ids(vocab, "Is the sky green? Answer in one word.")
    yes_or_no = constraint(LLMatcher.grammar_from_regex("(yes|no)"))
    deltas = await generate(smollm, prompt, constraint=yes_or_no, temperature=1.0, seed=seed, max_tokens=20)
    assert text(deltas) in {"yes", "no"}
    assert deltas[-1].finish_reason == "stop"


async def test_a_lark_grammar(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/\n'
    prompt = chat_ids(vocab, "What is six times seven?")
    for seed in (0, 1, 2):
        deltas = await generate(
            smollm, prompt, constraint=constraint(LLMatcher.grammar_from_lark(lark)), temperature=1.0, seed=seed
        )
        assert re.fullmatch(r"The answer is [1-9][0-9]{0,2}\.", text(deltas))
        assert deltas[-1].finish_reason == "stop"


async def test_greedy_sampling_follows_the_grammar_too(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Describe a user of our website as JSON.")
    first = await generate(smollm, prompt, constraint=json_constraint(PERSON), temperature=0, max_tokens=300)
    jsonschema.validate(json.loads(text(first)), PERSON)
    again = await generate(smollm, prompt, constraint=json_constraint(PERSON), temperature=0, max_tokens=300)
    assert ids(again) == ids(first)


async def test_a_reply_cut_by_max_tokens_finishes_with_length(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Describe a user of our website as JSON.")
    deltas = await generate(smollm, prompt, constraint=json_constraint(PERSON), temperature=0, max_tokens=5)
    assert deltas[-1].finish_reason == "length"
    assert len(ids(deltas)) == 5
    assert text(deltas).startswith('{"name": "')


async def test_min_tokens_never_leaves_the_grammar(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Is the sky green?")
    # The grammar is complete after one word: it ends the reply, min_tokens notwithstanding.
    yes_or_no = constraint(LLMatcher.grammar_from_regex("(yes|no)"))
    deltas = await generate(smollm, prompt, constraint=yes_or_no, temperature=1.0, seed=1, min_tokens=8)
    assert text(deltas) in {"yes", "no"}
    assert deltas[-1].finish_reason == "stop"
    # Only the end of sequence is allowed from the start: it wins over the ban.
    nothing = await generate(smollm, prompt, constraint=constraint(LLMatcher.grammar_from_regex("")), min_tokens=4)
    assert ids(nothing) == []
    assert nothing[-1].finish_reason == "stop"
    # Where the grammar allows more, the ban holds: the reply goes on inside the grammar.
    digits = constraint(LLMatcher.grammar_from_regex("[0-9]{1,40}"))
    for seed in (1, 2, 3):
        deltas = await generate(smollm, prompt, constraint=digits, temperature=1.0, seed=seed, min_tokens=6)
        assert len(ids(deltas)) >= 6
        assert re.fullmatch("[0-9]{1,40}", text(deltas))


async def test_logit_bias_cannot_push_a_reply_out_of_its_grammar(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    [banana] = vocab.encode(" banana")
    prompt = chat_ids(vocab, "Is the sky green?")
    yes_or_no = constraint(LLMatcher.grammar_from_regex("(yes|no)"))
    deltas = await generate(smollm, prompt, constraint=yes_or_no, temperature=0.7, seed=1, logit_bias={banana: 100})
    assert text(deltas) in {"yes", "no"}


async def test_an_invalid_grammar_fails_the_generation(smollm: LlamaCppBackend, vocab: GGUFTokenizer) -> None:
    prompt = chat_ids(vocab, "Hello")
    with pytest.raises(GenerationFailed, match="unknown name"):
        await generate(smollm, prompt, constraint=constraint(LLMatcher.grammar_from_lark("start: missing_rule")))
    # The slot serves the next request.
    deltas = await generate(smollm, prompt, constraint=constraint(LLMatcher.grammar_from_regex("(hi|hello)")))
    assert text(deltas) in {"hi", "hello"}


async def test_concurrent_slots_share_one_grammar_tokenizer(weights_dir: Path, vocab: GGUFTokenizer) -> None:
    backend = LlamaCppBackend(replace(embedded_config(), max_concurrency=2), weights_dir=weights_dir)
    await backend.start()
    try:
        prompt = chat_ids(vocab, "Describe a user of our website as JSON.")
        person = json_constraint(PERSON)
        sampling: dict[str, Any] = {"constraint": person, "temperature": 1.0, "max_tokens": 300}
        replies = await asyncio.gather(*(generate(backend, prompt, seed=seed, **sampling) for seed in (1, 2)))
        for deltas in replies:
            jsonschema.validate(json.loads(text(deltas)), PERSON)
        tokenizer = backend._grammar_tokenizer._tokenizer
        assert tokenizer is not None
        await generate(backend, prompt, constraint=person, max_tokens=4)
        assert backend._grammar_tokenizer._tokenizer is tokenizer, "built once per loaded model"
    finally:
        await backend.stop()
    assert backend._grammar_tokenizer._tokenizer is None, "it reads a model's vocabulary: gone with the models"


async def test_a_constraint_on_the_tiny_llama_2(tiny: LlamaCppBackend, llama2_tokenizer_dir: Path) -> None:
    # A SentencePiece vocabulary (and a random model): the grammar holds there too.
    sp = SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    prompt = [sp.bos_id, *sp.encode("[INST] Give me a phone number. [/INST]")]
    digits = constraint(LLMatcher.grammar_from_regex("[0-9]{3}-[0-9]{4}"))
    for seed in (0, 1):
        deltas = await generate(tiny, prompt, constraint=digits, temperature=1.0, seed=seed, max_tokens=20)
        assert re.fullmatch("[0-9]{3}-[0-9]{4}", text(deltas))
        assert deltas[-1].finish_reason == "stop"
        assert sp.decode(ids(deltas)) == text(deltas)


async def test_a_grammar_that_fails_after_sampling_bills_what_was_sampled(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer
) -> None:
    """An object that requires itself: llguidance accepts it, then gives up after the first token."""
    node = {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}
    looping = json_constraint({"$defs": {"node": node}, "$ref": "#/$defs/node"})
    prompt = chat_ids(vocab, "Write JSON.")
    request = GenerationRequest("test", prompt, SamplingParams(max_tokens=16), constraint=looping)
    deltas: list[TokenDelta] = []

    async def read() -> None:
        async for delta in smollm.generate(request):
            deltas.append(delta)

    with pytest.raises(GrammarRejected):
        await read()
    assert sum(len(delta.token_ids) for delta in deltas) >= 1
    assert "".join(delta.text for delta in deltas) == ""


async def test_a_grammar_with_no_reply_at_all_is_rejected_before_sampling(
    smollm: LlamaCppBackend, vocab: GGUFTokenizer
) -> None:
    never = constraint(LLMatcher.grammar_from_regex("[a&&b]"))
    with pytest.raises(GrammarRejected):
        await generate(smollm, chat_ids(vocab, "Say something."), constraint=never)
