"""The logits math the local engines share: log-sum-exp, the likeliest tokens, llguidance's bitmask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backends.distributions import allowed_tokens, logsumexp, top_tokens


def test_top_tokens_break_ties_by_id_and_skip_disallowed_tokens() -> None:
    row = np.array([1.0, 3.0, -np.inf, 3.0, 2.0, 3.0, -np.inf], dtype=np.float32)
    assert top_tokens(row, 2).tolist() == [1, 3]
    assert top_tokens(row, 4).tolist() == [1, 3, 5, 4]
    assert top_tokens(row, 7).tolist() == [1, 3, 5, 4, 0], "-inf entries are never alternatives"
    assert top_tokens(row, 0).tolist() == []


def test_top_tokens_of_a_large_row_match_a_full_sort() -> None:
    row = np.random.default_rng(0).normal(size=49152).astype(np.float32)
    row[::7] = -np.inf
    finite = np.flatnonzero(np.isfinite(row))
    assert top_tokens(row, 20).tolist() == finite[np.lexsort((finite, -row[finite]))][:20].tolist()


def test_logsumexp() -> None:
    row = np.array([1.0, 3.0, -np.inf, 3.0, 2.0, 3.0, -np.inf], dtype=np.float32)
    assert logsumexp(row) == pytest.approx(math.log(math.e + 3 * math.e**3 + math.e**2))
    assert logsumexp(np.full(4, -np.inf, dtype=np.float32)) == -math.inf
    big = np.array([1000.0, 1000.0], dtype=np.float32)
    assert logsumexp(big) == pytest.approx(1000 + math.log(2)), "no overflow"


def test_allowed_tokens_read_llguidance_bits() -> None:
    words = np.zeros(4, dtype=np.uint32)
    for token in (0, 31, 32, 33, 100):
        words[token >> 5] |= np.uint32(1 << (token & 31))
    bitmask = words.view(np.int32).reshape(1, 4)
    assert np.flatnonzero(allowed_tokens(bitmask, 200)).tolist() == [0, 31, 32, 33, 100]
    assert not allowed_tokens(bitmask, 200)[128:].any(), "tokens past the mask are never allowed"
    assert np.flatnonzero(allowed_tokens(bitmask, 40)).tolist() == [0, 31, 32, 33]
