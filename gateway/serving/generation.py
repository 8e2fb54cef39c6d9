"""One request's generation: ``n`` choices over one prompt, with stop sequences applied.

Every token the backend produced is counted, whatever happens to the request afterwards
(finished, stopped, cancelled by the client, failed), so usage is exact in every case.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace

from backends.base import Constraint, FinishReason, GenerationRequest, SamplingParams, TokenLogprob
from gateway.serving.queueing import Reservation
from gateway.serving.registry import ModelRuntime
from gateway.serving.stops import StopMatcher

SEED_SPACE = 2**64


@dataclass(frozen=True, slots=True)
class ChoiceEvent:
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens sampled since the last event, when the request asked for log-probabilities."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Generation:
    runtime: ModelRuntime
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stops: tuple[str, ...] = ()
    n: int = 1
    completion_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    """Seconds between consecutive tokens of a choice: the inter-token latency the client saw."""
    texts: dict[int, list[str]] = field(default_factory=dict)
    """The text given out for each choice (logged only when content logging is on)."""
    finish_reasons: dict[int, FinishReason] = field(default_factory=dict)
    stop_sequence_hit: bool = False
    continuation: bool = False
    """Legacy completions continue the prompt's text; chat replies start fresh."""
    reached_backend: bool = False
    """A choice got a slot and went to the engine: only then is the request billed."""
    reservation: Reservation | None = None
    """Slots promised at admission (``SlotQueue.reserve``); what is left is released at the end."""
    constraint: Constraint | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    replica: str | None = None
    """The remote worker that generated, when the backend names one (the last choice's, for n > 1)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return len(self.finish_reasons) == self.n

    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started_at) * 1000

    def _choice_sampling(self, index: int) -> SamplingParams:
        seed = self.sampling.seed
        if seed is None or index == 0:
            return self.sampling
        # Distinct but reproducible seeds, so n choices differ and a seeded request repeats.
        return replace(self.sampling, seed=(seed + index) % SEED_SPACE)

    async def _choice(self, index: int) -> AsyncGenerator[ChoiceEvent]:
        async with self.reservation.slot() if self.reservation else self.runtime.queue.slot():
            self.reached_backend = True
            request = GenerationRequest(
                self.request_id,
                self.prompt_ids,
                self._choice_sampling(index),
                continuation=self.continuation,
                constraint=self.constraint,
                logprobs=self.logprobs,
                prompt_logprobs=self.prompt_logprobs,
            )
            matcher = StopMatcher(self.stops)
            async with contextlib.aclosing(self.runtime.backend.generate(request)) as stream:
                last_token_at: float | None = None
                # Log-probabilities of tokens whose text the stop matcher still holds go out
                # with the next event, so every event's text and tokens stay together.
                logprobs: tuple[TokenLogprob, ...] = ()
                prompt_logprobs: tuple[TokenLogprob, ...] = ()
                async for delta in stream:
                    if delta.replica is not None:
                        self.replica = delta.replica
                    logprobs += delta.logprobs
                    prompt_logprobs += delta.prompt_logprobs
                    if delta.tokens:
                        now = time.monotonic()
                        if self.first_token_at is None:
                            self.first_token_at = now
                        if last_token_at is not None:
                            self.token_gaps_s.extend([(now - last_token_at) / delta.tokens] * delta.tokens)
                        last_token_at = now
                    self.completion_tokens += delta.tokens
                    text, hit = matcher.feed(delta.text)
                    if hit:
                        self.finish_reasons[index] = "stop"
                        self.stop_sequence_hit = True
                        yield ChoiceEvent(index, text, "stop", logprobs, prompt_logprobs)
                        return
                    if delta.finish_reason is not None:
                        self.finish_reasons[index] = delta.finish_reason
                        yield ChoiceEvent(index, text + matcher.flush(), delta.finish_reason, logprobs, prompt_logprobs)
                        return
                    if text or prompt_logprobs:
                        yield ChoiceEvent(index, text, None, logprobs, prompt_logprobs)
                        logprobs = prompt_logprobs = ()

    async def events(self) -> AsyncGenerator[ChoiceEvent]:
        """Events of all choices; with ``n > 1`` they interleave as the choices progress."""
        try:
            # One choice needs no interleaving: its events come straight from it, a layer fewer.
            source = self._choice(0) if self.n == 1 else self._interleaved()
            async with contextlib.aclosing(source) as events:
                async for event in events:
                    self.texts.setdefault(event.index, []).append(event.text)
                    yield event
        finally:
            self.release_unused_slots()

    def release_unused_slots(self) -> None:
        """Give back reserved slots no choice took (the request ended, or never started)."""
        if self.reservation is not None:
            self.reservation.release()

    async def _interleaved(self) -> AsyncGenerator[ChoiceEvent]:
        """Events of ``n`` choices as they come, each choice generated by a task of its own."""
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with contextlib.aclosing(self._choice(index)) as events:
                    async for event in events:
                        queue.put_nowait(event)
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(self.n)]
        try:
            remaining = self.n
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
