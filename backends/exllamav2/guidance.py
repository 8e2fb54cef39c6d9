"""Constraints and log-probabilities on exllamav2: one `ExLlamaV2Filter` per job, driven by llguidance.

exllamav2's sampler hands each of a job's filters the job's logits row (a CPU float tensor)
through ``mask_logits`` before temperature and truncation, and every sampled token through
``feed``. The filter made here (`guided_filter_class`, a subclass of exllamav2's own, built when
the engine is imported) delegates to a `TokenGuide`, which needs neither torch nor exllamav2:

- with a constraint it sets every token the grammar disallows to -inf in that row, in place, and
  consumes each sampled token; once the grammar is complete it allows only the end-of-sequence
  token, which ends the job as a stop token (never counted);
- with logprobs it keeps a copy of the row and, when the sampled token is fed, records that
  token's log-softmax value and the most likely alternatives, as the llama.cpp backend does.

exllamav2's own ``return_top_tokens`` and ``token_probs`` are taken after temperature and
top-k/top-p, so they are not used. What the values include differs from llama.cpp in two ways
that exllamav2 decides before any filter runs: its repetition, presence and frequency penalties
are already applied (with neutral penalties the values are the same), and stop tokens banned
until ``min_new_tokens`` (set to -1e30) are reported as not allowed.

The llguidance tokenizer comes from the model directory's ``tokenizer.json`` (`grammar_tokenizer`).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from numpy.typing import NDArray

from backends.base import GenerationFailed, GenerationRequest, GrammarRejected, TokenLogprob
from backends.distributions import Logits, allowed_tokens, logsumexp, top_tokens

# exllamav2 bans stop tokens before min_new_tokens with this value rather than -inf.
_BANNED = -1e30


def grammar_tokenizer(tokenizer_json: Path, vocab_size: int, eos_token: int) -> LLTokenizer:
    """llguidance's view of the model's vocabulary (about a second to build: once per model)."""
    return LLTokenizer(str(tokenizer_json), n_vocab=vocab_size, eos_token=eos_token)


class TokenGuide:
    """One job's grammar and log-probabilities, fed by the filter in the order exllamav2 samples."""

    def __init__(
        self,
        tokenizer: LLTokenizer,
        grammar: str | None = None,
        top_logprobs: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = tokenizer.vocab_size
        self._matcher: LLMatcher | None = None
        self._bitmask: NDArray[np.int32] | None = None
        if grammar is not None:
            self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
            self._check()
            self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._top = top_logprobs
        self._row: Logits | None = None
        self._entries: deque[TokenLogprob] = deque()
        self._pieces: dict[int, bytes] = {}

    @property
    def constrained(self) -> bool:
        return self._matcher is not None

    def begin(self) -> None:
        """A job (re)starts sampling: nothing consumed, nothing recorded."""
        if self._matcher is not None:
            self._matcher.reset()
        self._entries.clear()
        self._row = None

    def prepare(self) -> None:
        """Compute the next token mask (exllamav2 may call this on a pool thread during the forward pass)."""
        if self._matcher is not None and self._bitmask is not None:
            fill_next_token_bitmask(self._matcher, self._bitmask)
            self._check()

    def allowed(self) -> tuple[set[int] | None, set[int] | None]:
        """exllamav2's set-based filter step (taken when a job samples several rows at once, where
        ``mask`` is not used): the tokens allowed next and, of those, the ones that end the reply.
        ``(None, None)`` restricts nothing. Log-probabilities are recorded on the masking path only."""
        if self._bitmask is None:
            return None, None
        self.prepare()
        allowed = {int(token) for token in np.flatnonzero(allowed_tokens(self._bitmask, self._vocab_size))}
        return allowed, allowed & set(self._tokenizer.eos_tokens)

    def mask(self, row: Logits) -> None:
        """Apply the mask to the job's logits row, in place, and keep what the logprobs need."""
        row[self._vocab_size :] = -np.inf  # the head's padding past the vocabulary
        if self._bitmask is not None:
            row[~allowed_tokens(self._bitmask, row.size)] = -np.inf
        if self._top is not None:
            kept = row.copy()
            kept[kept <= _BANNED] = -np.inf
            self._row = kept

    def feed(self, token: int) -> None:
        """The token exllamav2 sampled from the last masked row."""
        matcher = self._matcher
        if matcher is not None and token not in self._tokenizer.eos_tokens and not matcher.consume_token(token):
            raise GrammarRejected(f"token {token} left the grammar: {matcher.get_error()}")
        if self._top is not None and self._row is not None:
            row, self._row = self._row, None
            lse = logsumexp(row)
            top = tuple((self.piece(int(i)), float(row[i]) - lse) for i in top_tokens(row, self._top))
            self._entries.append(TokenLogprob(self.piece(token), float(row[token]) - lse, top, token))

    def take(self, count: int) -> tuple[TokenLogprob, ...]:
        """The entries of the next ``count`` tokens exllamav2 released, in order."""
        if self._top is None:
            return ()
        return tuple(self._entries.popleft() for _ in range(min(count, len(self._entries))))

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (none for special tokens), as llama.cpp spells them."""
        piece = self._pieces.get(token)
        if piece is None:
            special = self._tokenizer.is_special_token(token)
            piece = b"" if special else self._tokenizer.decode_bytes([token])
            self._pieces[token] = piece
        return piece

    def _check(self) -> None:
        if self._matcher is not None and self._matcher.is_error():
            raise GrammarRejected(f"the grammar cannot be used: {self._matcher.get_error()}")


def guided_filter_class(base: type) -> type:
    """exllamav2's ``ExLlamaV2Filter`` subclass that drives a `TokenGuide` (``base`` is that class)."""

    class GuidedFilter(base):  # type: ignore[misc]
        def __init__(self, model: Any, tokenizer: Any, guide: TokenGuide) -> None:
            super().__init__(model, tokenizer)
            self.guide = guide

        def begin(self, prefix_str: str = "") -> None:
            self.guide.begin()

        def feed(self, token: Any) -> None:
            self.guide.feed(int(token.item()) if hasattr(token, "item") else int(token))

        def next(self) -> Any:
            return self.guide.allowed()

        def use_background_worker(self) -> bool:
            return True

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            self.guide.prepare()
            return True

        def mask_logits(self, logits: Any) -> Any:
            self.guide.mask(logits.numpy())
            return logits

    return GuidedFilter


def guide_for(tokenizer: LLTokenizer | None, request: GenerationRequest) -> TokenGuide | None:
    """The guide a request needs, or None when it asks for neither a constraint nor logprobs."""
    constraint = request.constraint
    if constraint is None and request.logprobs is None:
        return None
    if tokenizer is None:
        raise GenerationFailed("llguidance could not read this model's tokenizer.json")
    return TokenGuide(tokenizer, constraint.grammar if constraint is not None else None, request.logprobs)
