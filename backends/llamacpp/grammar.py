"""Constrained sampling: llguidance's token mask, written into llama.cpp's logits in place.

Before each sampling step the request's `GrammarMask` asks its matcher for the tokens that keep
the reply inside the grammar (a bitmask, one bit per token) and sets every other token's logit
to -inf in the context's logits buffer, the very row the sampler chain then reads. So every
sampler (penalties, temperature, top-k/top-p, greedy) only ever sees allowed tokens, and the
log-probabilities read from the same row are renormalised over them. After sampling, the token
is consumed; once the matcher is stopped the reply is complete.

`GrammarTokenizer` holds llguidance's view of the model's vocabulary, built once per loaded
model on the first constrained request (it reads every token's bytes: 0.3 s for 49k tokens) and
shared by every slot's thread. It calls back into llama.cpp's tokenizer through the vocabulary
it was built from, so the backend clears it before it closes the models.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from numpy.typing import NDArray

from backends.base import GenerationFailed, GrammarRejected
from backends.distributions import allowed_tokens

_MAX_PIECE_BYTES = 16 * 1024


class GrammarTokenizer:
    """llguidance's tokenizer for one loaded model, built on first use; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokenizer: LLTokenizer | None = None

    def get(self, vocab: Any) -> LLTokenizer:
        """The tokenizer, built from ``vocab`` (a ``llama_vocab`` pointer) by the first caller."""
        tokenizer = self._tokenizer
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _tokenizer_from_vocab(vocab)
            return self._tokenizer

    def clear(self) -> None:
        """Forget the tokenizer (before the model whose vocabulary it reads is closed)."""
        with self._lock:
            self._tokenizer = None


def _tokenizer_from_vocab(vocab: Any) -> LLTokenizer:
    """``llguidance.llamacpp.lltokenizer_from_vocab``, through llama.cpp's current API.

    llguidance 1.9.1's own helper reads token attributes with ``llama_token_get_attr``, which
    llama-cpp-python 0.3.36 deprecates with a warning.
    """
    from llama_cpp import llama_cpp as lib

    buffer = ctypes.create_string_buffer(_MAX_PIECE_BYTES)
    tokens: list[bytes] = []
    for token in range(lib.llama_vocab_n_tokens(vocab)):
        n = lib.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        if n < 0:
            raise GenerationFailed(f"token {token} does not fit a {len(buffer)}-byte piece buffer")
        piece = buffer.raw[:n]
        attributes = lib.llama_vocab_get_attr(vocab, token)
        # llguidance marks special tokens with a leading 0xff byte, as its helper does.
        if attributes & lib.LLAMA_TOKEN_ATTR_CONTROL or (
            attributes & lib.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        tokens.append(piece)
    tokenize = ctypes.cast(lib._lib.llama_tokenize, ctypes.c_void_p).value
    tokenizer: LLTokenizer = LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=tokens, vocab_ptr=vocab, tokenize_fptr=tokenize, eos_token=lib.llama_vocab_eos(vocab), slices=None
    )
    return tokenizer


class GrammarMask:
    """One reply's grammar: which tokens may come next, and whether the reply is complete."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str) -> None:
        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarRejected(f"the grammar cannot be used: {self._matcher.get_error()}")
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._eos_tokens = [token for token in tokenizer.eos_tokens if 0 <= token < tokenizer.vocab_size]

    def apply(self, logits: NDArray[np.float32]) -> None:
        """Set the logit of every token the grammar does not allow next to -inf, in place."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        self._check()
        # Tokens of the model that llguidance's vocabulary lacks are never allowed.
        logits[~allowed_tokens(self._bitmask, logits.size)] = -np.inf

    def allows_only_eos(self) -> bool:
        """Whether the last mask allows nothing but the end-of-sequence token(s)."""
        words = self._bitmask[0].view(np.uint32).copy()
        for token in self._eos_tokens:
            words[token >> 5] &= ~np.uint32(1 << (token & 31))
        return not words.any()

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarRejected(f"token {token} left the grammar: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar is matched and allows no further token: the reply ends here."""
        return self._matcher.is_stopped()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarRejected(f"the grammar failed: {self._matcher.get_error()}")
