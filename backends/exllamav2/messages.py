"""Messages between the event loop and the generator thread.

The loop sends commands (`JobRequest`, `Cancel`, `Stop`) through a queue; the thread answers each
request with events (`Tokens`, `Failure`) delivered on the request's own loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from backends.base import FinishReason, GenerationRequest, TokenLogprob


@dataclass(frozen=True, slots=True)
class Tokens:
    token_ids: tuple[int, ...]
    """Every token sampled since the previous event (EOS excluded), read from the job's sequence."""
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token of ``token_ids`` when the request asked for log-probabilities."""


@dataclass(frozen=True, slots=True)
class Failure:
    message: str
    grammar: bool = False
    """The request's grammar was refused (``GrammarRejected``), not the engine."""


Event = Tokens | Failure


@dataclass(slots=True)
class JobRequest:
    key: int
    request: GenerationRequest
    logit_bias: list[tuple[int, float]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event]
    job: Any = None
    guide: Any = None
    """The job's `TokenGuide` (constraint, logprobs), when it has one."""
    counted: int = 0
    """Sampled tokens already reported, by the job's own count (``new_tokens``)."""


@dataclass(frozen=True, slots=True)
class Cancel:
    key: int


@dataclass(frozen=True, slots=True)
class Stop:
    pass


Command = JobRequest | Cancel | Stop


def deliver(batch: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    for events, event in batch:
        events.put_nowait(event)


@dataclass(slots=True)
class Loaded:
    paged: bool
    max_batch_size: int
    vocab_size: int
    eos_token_id: int
    devices: list[str] = field(default_factory=list)
    grammar_tokenizer: Any = None
    """llguidance's tokenizer for constraints and logprobs; None when it could not read tokenizer.json."""
