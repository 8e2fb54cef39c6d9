"""The protocol every inference engine implements, and the values that cross it.

Error hierarchy::

    BackendError                 a backend could not serve a request
    ├── BackendUnavailable       not started, or failed to start (configuration, missing GPU, ...)
    └── GenerationFailed         the engine failed in the middle of a generation

Token counting convention (identical on every backend): ``completion_tokens`` counts every
token the engine sampled for the reply, including any it holds back from the text for a while,
excluding the end-of-sequence token that ended generation. A stop sequence ends generation
after the token that completed it; that token is counted even though the stop text itself is
not returned.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for per token (OpenAI's own limit)."""


class BackendError(Exception):
    """A backend could not serve a request."""


class BackendUnavailable(BackendError):
    """The backend is not running or could not be started."""


class GenerationFailed(BackendError):
    """The engine failed while generating."""


class GrammarRejected(GenerationFailed):
    """The request's grammar leaves this model no reply: its language is empty (``[a&&b]``, a
    schema that requires itself), or following it exceeds the grammar engine's limits. The
    request's own fault, answered with a 400; another model would fail the same way."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Every sampler setting, explicit: engines' own defaults are never relied upon.

    Neutral values switch a setting off: ``top_k=0``, ``top_p=1``, ``min_p=0``,
    ``repetition_penalty=1``, penalties 0, ``min_tokens=0``. ``temperature=0`` means greedy.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate. Stop strings are applied by the gateway, not the engine."""

    request_id: str
    prompt_ids: Sequence[int]
    sampling: SamplingParams
    continuation: bool = False
    """The text continues the prompt (legacy completions): keep the first token's leading space,
    which a chat reply drops as Meta's reference decode does."""
    constraint: Constraint | None = None
    """A grammar every sampled token must keep the reply within (structured output, tool calls)."""
    logprobs: int | None = None
    """Report each sampled token's log-probability and this many most likely alternatives
    (0 to ``MAX_TOP_LOGPROBS``); ``None`` reports none."""
    prompt_logprobs: int | None = None
    """Also report the prompt's tokens' log-probabilities (legacy completions' ``echo``)."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A grammar the reply must match, compiled once by the gateway for every backend.

    ``grammar`` is an llguidance grammar (``llguidance.LLMatcher.grammar_from_*``), which the
    local engines enforce token by token. ``source`` says where it came from, in the fields
    vLLM and this gateway accept on ``/v1/completions`` (``guided_json``, ``guided_regex`` or
    ``guided_grammar``), so a remote worker can enforce the same thing.
    """

    grammar: str
    source: Mapping[str, object]
    param: str | None = None
    """The request field the grammar came from, named in the 400 when the model cannot follow it."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled (or prompt) token's log-probability, and its most likely alternatives.

    Values are natural logarithms of the engine's distribution after ``logit_bias`` and the
    constraint's mask, before penalties, temperature, truncation (top-k, top-p, min-p) and the
    ``min_tokens`` end-of-sequence ban, so they do not depend on how the token was picked. A
    prompt's values are the model's raw distribution. ``logprob`` is ``None`` only for a prompt's
    first token.
    """

    token_bytes: bytes
    logprob: float | None
    top: tuple[tuple[bytes, float], ...] = ()
    token_id: int | None = None


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """Newly generated text and the tokens that produced it.

    ``text`` may be empty when a token ends inside a multi-byte character; its bytes are
    carried over into the next delta. The last delta of a generation has ``finish_reason`` set.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    token_count: int | None = None
    """Tokens this delta stands for, when the engine reports counts but not ids (a remote worker)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token of this delta when the request asked for log-probabilities."""
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """On the first delta only, when the request asked for the prompt's log-probabilities."""
    replica: str | None = None
    """Where the tokens were generated, when the engine spreads requests over replicas (a remote
    worker's base URL); set on the first delta of a generation, for logs."""

    @property
    def tokens(self) -> int:
        return len(self.token_ids) if self.token_count is None else self.token_count


@dataclass(frozen=True, slots=True)
class BackendCapabilities:
    """What a backend can do, so the gateway can reject what it cannot."""

    max_concurrency: int
    """Generations that run at once; more requests wait in the gateway's queue."""
    context_length: int
    supports_logit_bias: bool = True
    supports_seed: bool = True
    supports_constraints: bool = False
    supports_logprobs: bool = False
    supports_prompt_logprobs: bool = False


@runtime_checkable
class Backend(Protocol):
    """An inference engine serving one model."""

    @property
    def capabilities(self) -> BackendCapabilities: ...

    async def start(self) -> None:
        """Load the model. Raises `BackendUnavailable` with one clear sentence on failure."""

    async def stop(self) -> None:
        """Release the model and any worker threads."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        """Stream deltas for one sequence.

        Closing the iterator early (``aclose()`` or task cancellation) must stop the engine's
        work for this request at once and free its slot. That cleanup must not await: it may
        run inside a task whose cancel scope cancels every further await (a client that went
        away mid-stream). Generation runs off the event loop.
        """
        ...


@runtime_checkable
class Preflight(Protocol):
    """A backend that can tell, before the server starts, whether it will be able to start."""

    def preflight(self) -> None:
        """Raise `BackendUnavailable` with one clear sentence; load nothing heavy."""


class ReplicaObserver(Protocol):
    """Told how a backend with several replicas routes its requests (the gateway's metrics).

    Called on the event loop, so it must not block; it must not raise.
    """

    def served(self, replica: str) -> None:
        """``replica`` produced the first token of a generation."""

    def skipped(self, replica: str, reason: str) -> None:
        """A generation left ``replica`` before its first token, for ``reason``."""

    def rotation(self, replica: str, *, in_rotation: bool) -> None:
        """``replica`` was taken out of rotation, or came back (also told once per replica on attach)."""


@runtime_checkable
class HasReplicas(Protocol):
    """A backend that spreads requests over replicas and reports where each one went."""

    def observe_replicas(self, observer: ReplicaObserver) -> None:
        """Report to ``observer`` from now on, starting with every replica's rotation state."""


@runtime_checkable
class ReportsProblems(Protocol):
    """A backend that can lose its engine while serving (a process that died and is restarting)."""

    def problem(self) -> str | None:
        """Why the backend cannot serve now, in one sentence; ``None`` while it can."""
        ...

    @property
    def engine_exits(self) -> int:
        """How many times its engine ended while serving, since the backend was built."""
        ...


WeightsProgress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) while weights are being made."""


@runtime_checkable
class PreparesWeights(Protocol):
    """A backend that makes the weights file it loads (a conversion, say) before it can start."""

    def prepare_weights(self, progress: WeightsProgress | None = None) -> Path:
        """Make the weights once (later calls find them) and return the file to load. Blocking."""
        ...
