"""Text deltas from the token ids exllamav2 releases, decoded by the model's own tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    The deltas concatenate to ``decode(all ids)``, however tokens split multi-byte characters
    or a tokenizer strips the leading space: each step decodes a short window twice (with and
    without the new ids) and emits the difference, holding text back while it ends in an
    incomplete character.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        # ``context`` (the prompt's last token, for a continuation) is decoded along but never
        # emitted, so the first new token keeps the leading space it has after that context.
        self._decode = decode
        self._ids: list[int] = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
