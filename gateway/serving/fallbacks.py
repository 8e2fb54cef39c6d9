"""Per-model fallbacks: the first candidate whose generation starts serves the request.

A model's ``fallbacks`` (configuration) lists other models that may serve its requests. When the
requested model's generation fails (``BackendError``) before it produced one event, nothing has
reached the client, so the next candidate gets the request instead: its own prompt (its template
and tokenizer), its own sampling defaults and its own queue, built by the caller when that
candidate's turn comes. Once an event has been handed on, a failure is the request's failure.
Only the requested model's list is followed: a fallback's own fallbacks are not. A grammar the
model cannot follow (``GrammarRejected``) is the request's fault and is not retried elsewhere.

One request keeps one usage ticket whatever happens here: the ticket is finished with
``FirstToStart.generation``, the generation of the candidate that served (or the last one that
failed), so the usage row names that model and its prices. Tokens a failed candidate produced
without an event (text held by a stop matcher) reached no one and are not billed.

The caller's candidate type carries its ``Generation`` and whatever else belongs to that model
(a route's choice assemblers, say); ``FirstToStart`` is generic over it so that streamed and
whole responses, and predictions, share this one loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import structlog

from backends.base import BackendError, GrammarRejected
from gateway.serving.generation import ChoiceEvent, Generation

_logger = structlog.get_logger("gateway.serving.fallbacks")


class Candidate(Protocol):
    @property
    def generation(self) -> Generation: ...


class FirstToStart[C: Candidate]:
    """Events of the first candidate whose generation starts; ``current`` is the one running."""

    def __init__(self, first: C, later: Callable[[], AsyncGenerator[C]] | None = None) -> None:
        self.current = first
        self.requested_model = first.generation.runtime.name
        self._later = later

    @property
    def generation(self) -> Generation:
        return self.current.generation

    @property
    def fell_back(self) -> bool:
        return self.generation.runtime.name != self.requested_model

    def events(self) -> AsyncGenerator[ChoiceEvent]:
        if self._later is None:
            # Nothing to fall back on: the generation's own events, without a layer that passes
            # each one on.
            return self.generation.events()
        return self._falling_back(self._later)

    async def _falling_back(self, candidates: Callable[[], AsyncGenerator[C]]) -> AsyncGenerator[ChoiceEvent]:
        later: AsyncGenerator[C] | None = None
        try:
            while True:
                started = False
                try:
                    async with contextlib.aclosing(self.generation.events()) as events:
                        async for event in events:
                            started = True
                            yield event
                    return
                except BackendError as exc:
                    # A grammar no reply can follow fails on every model alike.
                    if started or isinstance(exc, GrammarRejected):
                        raise
                    if later is None:
                        later = candidates()
                    following = await anext(later, None)
                    if following is None:
                        raise
                    _logger.warning(
                        "model_fallback",
                        model=self.generation.runtime.name,
                        fallback=following.generation.runtime.name,
                        error=str(exc),
                    )
                    self.current = following
        finally:
            if later is not None:
                await later.aclose()
