"""The bytes of single tokens, as llama.cpp spells them."""

from __future__ import annotations

import ctypes
from typing import Any

from backends.base import GenerationFailed

_PIECE_BUFFER_SIZE = 256


class TokenPieces:
    """One token's bytes at a time, through one reusable buffer (one per generation thread)."""

    def __init__(self, vocab: Any) -> None:
        from llama_cpp import llama_cpp as lib

        self._to_piece = lib.llama_token_to_piece
        self._vocab = vocab
        self._buffer = ctypes.create_string_buffer(_PIECE_BUFFER_SIZE)

    def text(self, token: int) -> bytes:
        """The raw bytes the token adds to the text (it may hold part of a UTF-8 character).

        Control tokens (``<|im_end|>``, ``</s>``) add nothing to a text, so they have no bytes.
        """
        n = int(self._to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, False))
        if n < 0:
            raise GenerationFailed(f"token {token} does not fit a {len(self._buffer)}-byte piece buffer")
        return self._buffer.raw[:n]
