"""``FirstToStart``: the first candidate whose generation starts serves; nothing is replayed."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import pytest

from backends.base import (
    BackendCapabilities,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    SamplingParams,
    TokenDelta,
)
from backends.scripted import ScriptedBackend
from gateway.serving.fallbacks import FirstToStart
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from gateway.serving.tokenizers import load_tokenizer
from tests.support.model_configs import scripted_model


@dataclass
class FailingBackend:
    """Sends ``tokens`` tokens, then fails."""

    tokens: int = 0
    calls: int = 0
    error: type[GenerationFailed] = GenerationFailed

    @property
    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(max_concurrency=4, context_length=4096)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        self.calls += 1
        for index in range(self.tokens):
            yield TokenDelta(f" t{index}", (index,))
        raise self.error("the engine broke")


@dataclass
class Candidate:
    generation: Generation


def _candidate(name: str, backend: object) -> Candidate:
    config = scripted_model(name, max_concurrency=4)
    runtime = ModelRuntime(config, backend, load_tokenizer(config), None)  # type: ignore[arg-type]
    return Candidate(Generation(runtime, "req_fallback", [1, 2, 3], SamplingParams(max_tokens=8)))


def _later(*candidates: Candidate, asked: list[str] | None = None) -> object:
    async def later() -> AsyncGenerator[Candidate]:
        for candidate in candidates:
            if asked is not None:
                asked.append(candidate.generation.runtime.name)
            yield candidate

    return later


async def _texts(chain: FirstToStart[Candidate]) -> str:
    return "".join([event.text async for event in chain.events()])


async def test_a_candidate_failing_before_its_first_event_hands_the_request_on() -> None:
    broken = FailingBackend()
    chain = FirstToStart(
        _candidate("first", broken),
        _later(_candidate("second", FailingBackend()), _candidate("third", ScriptedBackend(reply="from third"))),  # type: ignore[arg-type]
    )
    assert await _texts(chain) == "from third"
    assert chain.generation.runtime.name == "third"
    assert chain.fell_back
    assert chain.generation.completion_tokens == 2
    assert broken.calls == 1


async def test_a_failure_after_an_event_is_the_requests_failure() -> None:
    asked: list[str] = []
    chain = FirstToStart(
        _candidate("first", FailingBackend(tokens=2)),
        _later(_candidate("second", ScriptedBackend(reply="never")), asked=asked),  # type: ignore[arg-type]
    )
    seen: list[str] = []

    async def read() -> None:
        async for event in chain.events():
            seen.append(event.text)

    with pytest.raises(GenerationFailed):
        await read()
    assert seen
    assert asked == []
    assert not chain.fell_back
    assert chain.generation.completion_tokens == 2


async def test_when_every_candidate_fails_the_last_failure_stands() -> None:
    chain = FirstToStart(_candidate("first", FailingBackend()), _later(_candidate("second", FailingBackend())))  # type: ignore[arg-type]
    with pytest.raises(GenerationFailed):
        await _texts(chain)
    assert chain.generation.runtime.name == "second"
    assert chain.generation.reached_backend


async def test_without_fallbacks_a_failure_is_raised_as_it_is() -> None:
    chain = FirstToStart(_candidate("only", FailingBackend()))
    with pytest.raises(GenerationFailed, match="the engine broke"):
        await _texts(chain)


async def test_a_grammar_no_model_can_follow_is_not_handed_on() -> None:
    asked: list[str] = []
    chain = FirstToStart(
        _candidate("first", FailingBackend(error=GrammarRejected)),
        _later(_candidate("second", ScriptedBackend(reply="never")), asked=asked),  # type: ignore[arg-type]
    )
    with pytest.raises(GrammarRejected):
        await _texts(chain)
    assert asked == []
    assert not chain.fell_back
