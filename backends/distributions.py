"""One row of logits as a distribution: log-probabilities, the likeliest tokens, a grammar's mask.

Shared by the local engines, so that every backend reports the same values the same way (what the
values are is `backends.base.TokenLogprob`'s docstring). Only what is asked for is computed: a
token's value is ``logit - logsumexp(row)`` (one pass of ``exp`` over the row), and the likeliest
tokens come from a partition of the row, never a full sort.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Logits = NDArray[np.float32]


def logsumexp(row: Logits) -> float:
    """``log(sum(exp(row)))``, summed in float64; -inf when every entry is -inf."""
    peak = float(np.max(row))
    if peak == -np.inf:
        return peak
    return peak + float(np.log(np.sum(np.exp(row - peak), dtype=np.float64)))


def top_tokens(row: Logits, k: int) -> NDArray[np.intp]:
    """The ids of the ``k`` largest finite entries, largest first, equal values by ascending id."""
    k = min(k, row.size)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    kth = row[np.argpartition(row, row.size - k)[row.size - k]]
    # Every entry tied with the k-th competes for the last places, so ties break by id, not by
    # where the partition happened to put them.
    candidates = np.flatnonzero(row > -np.inf) if kth == -np.inf else np.flatnonzero(row >= kth)
    order = np.lexsort((candidates, -row[candidates]))
    return candidates[order[:k]]


def allowed_tokens(bitmask: NDArray[np.int32], size: int) -> NDArray[np.bool_]:
    """Token i is allowed when bit i of an llguidance bitmask is set; tokens past the mask are not."""
    covered = min(size, bitmask.size * 32)
    allowed = np.zeros(size, dtype=bool)
    allowed[:covered] = np.unpackbits(bitmask.view(np.uint8), count=covered, bitorder="little")
    return allowed
