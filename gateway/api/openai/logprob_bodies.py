"""Log-probabilities in OpenAI's two shapes: chat's ``content`` list and legacy completions' columns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from backends.base import TokenLogprob

FLOOR = -9999.0
"""What OpenAI reports for a token with no probability at all (JSON has no -infinity)."""


def token_text(token_bytes: bytes) -> str:
    """A token's text; a piece of a multi-byte character shows its bytes, as OpenAI's tokens do."""
    try:
        return token_bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in token_bytes) if token_bytes else ""


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion (or of one chunk)."""
    return {
        "content": [
            {
                "token": token_text(entry.token_bytes),
                "logprob": _value(entry.logprob if entry.logprob is not None else 0.0),
                "bytes": list(entry.token_bytes),
                "top_logprobs": [
                    {"token": token_text(alt), "logprob": _value(value), "bytes": list(alt)} for alt, value in entry.top
                ],
            }
            for entry in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int = 0) -> dict[str, Any]:
    """``choices[i].logprobs`` of a legacy completion: parallel columns, offsets into the text.

    ``text_offset`` is where the first entry's token starts in the choice's text (a streamed
    chunk continues from the text sent before it).
    """
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        text = token_text(entry.token_bytes)
        tokens.append(text)
        values.append(None if entry.logprob is None else _value(entry.logprob))
        tops.append(None if entry.logprob is None else {token_text(alt): _value(v) for alt, v in entry.top})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
