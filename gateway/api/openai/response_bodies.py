"""OpenAI response bodies and SSE chunks, for chat and legacy completions."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from gateway.serving.generation import Generation

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"

Kind = Literal["chat", "text"]


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_urlsafe(18)


def usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


@dataclass
class ChunkWriter:
    """Builds the chunks of one streamed response; every chunk shares id and created."""

    kind: Kind
    model: str
    include_usage: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.kind)

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _chunk(self, choices: list[dict[str, Any]]) -> bytes:
        body = self._envelope(choices)
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def role(self, index: int) -> bytes:
        return self._chunk([self._choice(index, {"role": "assistant", "content": ""}, None)])

    def content(self, index: int, text: str) -> bytes:
        return self._chunk([self._choice(index, {"content": text}, None)])

    def finish(self, index: int, reason: str) -> bytes:
        return self._chunk([self._choice(index, {}, reason)])

    def usage(self, generation: Generation) -> bytes:
        return sse(self._envelope([]) | {"usage": usage(generation)})

    def _choice(self, index: int, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": delta.get("content", ""), "logprobs": None, "finish_reason": reason}


def error_event(message: str, type: str = "server_error", code: str | None = None) -> bytes:
    return sse({"error": {"message": message, "type": type, "param": None, "code": code}})


def chat_body(generation: Generation, model: str, texts: dict[int, list[str]]) -> dict[str, Any]:
    def message(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text, "refusal": None}}

    return _body("chat", "chat.completion", generation, model, texts, message)


def text_body(generation: Generation, model: str, texts: dict[int, list[str]]) -> dict[str, Any]:
    return _body("text", "text_completion", generation, model, texts, lambda text: {"text": text})


def _body(
    kind: Kind,
    object_name: str,
    generation: Generation,
    model: str,
    texts: dict[int, list[str]],
    content: Callable[[str], dict[str, Any]],
) -> dict[str, Any]:
    """A whole (non-streamed) response: one choice per ``n``, each with its text in ``content``'s shape."""
    return {
        "id": new_id(kind),
        "object": object_name,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                **content("".join(texts.get(i, []))),
                "logprobs": None,
                "finish_reason": generation.finish_reasons.get(i),
            }
            for i in range(generation.n)
        ],
        "usage": usage(generation),
    }
