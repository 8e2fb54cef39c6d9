"""Recent encodings of repeated texts, so a prompt's repeated parts are tokenized once.

Chat clients resend the same system prompt with every request, and a conversation resends every
earlier turn: with the llama-2 template each turn is encoded as one text (``[INST] … [/INST]``), so
all but the newest are texts seen before. Encoding is a pure function of the text, so a remembered
result is exactly what encoding again would give.

Bounded twice: only texts up to ``max_chars`` are kept (a long text costs the encoder far more than
the lookup saves anyway), and at most ``entries`` of them, least recently used dropped first.
Prompts may be built in worker threads (large bodies), hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

DEFAULT_ENTRIES = 1024
DEFAULT_MAX_CHARS = 4096


class EncodeMemo:
    def __init__(
        self,
        encode: Callable[[str], list[int]],
        *,
        entries: int = DEFAULT_ENTRIES,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self._encode = encode
        self._entries = entries
        self._max_chars = max_chars
        # Insertion order is recency order: a hit is moved to the end, the front is evicted.
        self._recent: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def __call__(self, text: str) -> list[int]:
        if len(text) > self._max_chars:
            return self._encode(text)
        with self._lock:
            ids = self._recent.pop(text, None)
            if ids is not None:
                self._recent[text] = ids
                return list(ids)  # callers own the list they get
        encoded = self._encode(text)
        with self._lock:
            self._recent[text] = tuple(encoded)
            if len(self._recent) > self._entries:
                del self._recent[next(iter(self._recent))]
        return encoded

    def __len__(self) -> int:
        return len(self._recent)
