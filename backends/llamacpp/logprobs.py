"""Log-probabilities of sampled and prompt tokens, from one row of logits.

What the values are (`backends.base.TokenLogprob` states it for every backend): the natural
log-softmax of the model's logits after the request's ``logit_bias`` and the constraint's mask,
before the repetition, presence and frequency penalties, the temperature and the truncations
(top-k, top-p, min-p). The mask leaves disallowed tokens at -inf, so the distribution is
renormalised over the tokens the grammar allows and those never appear among the alternatives.
``min_tokens``' ban on the end-of-sequence token is a sampler setting too and is not applied.
A prompt's tokens are scored by the model's own distribution: bias and mask shape the reply only.
Bytes are the token's text piece, so control tokens (``<|im_end|>``) have none.

The math is `backends.distributions`', shared with the other local engines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from backends.base import GenerationFailed, TokenLogprob
from backends.distributions import Logits, logsumexp, top_tokens
from backends.llamacpp.pieces import TokenPieces


def logits_row(ctx: Any, index: int, n_vocab: int) -> Logits:
    """A writable view of one output position's logits in a llama.cpp context (``-1``: the last)."""
    pointer = ctx.get_logits_ith(index)
    if not pointer:
        raise GenerationFailed(f"llama.cpp has no logits for output {index}")
    row: Logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,))
    return row


class LogprobReporter:
    """`TokenLogprob` entries for one request: its number of alternatives, its logit bias."""

    def __init__(
        self, top: int, pieces: TokenPieces, n_vocab: int, logit_bias: Mapping[int, float] | None = None
    ) -> None:
        self._top = top
        self._pieces = pieces
        # Ids outside the vocabulary are ignored, as llama.cpp's logit-bias sampler ignores them.
        bias = {token: value for token, value in (logit_bias or {}).items() if 0 <= token < n_vocab}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.intp, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def entry(self, logits: Logits, token: int) -> TokenLogprob:
        """``token``'s entry, given the logits it was picked from (a constraint's mask already applied)."""
        row = logits
        if self._bias_ids.size:
            row = logits.copy()
            row[self._bias_ids] += self._bias_values
        lse = logsumexp(row)
        top = tuple((self._pieces.text(int(i)), float(row[i]) - lse) for i in top_tokens(row, self._top))
        return TokenLogprob(self._pieces.text(token), float(row[token]) - lse, top, token)

    def first_prompt_token(self, token: int) -> TokenLogprob:
        """Nothing comes before the prompt's first token, so it has no value."""
        return TokenLogprob(self._pieces.text(token), None, (), token)
