"""OpenAI response bodies and SSE chunks, for chat and legacy completions."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from backends.base import TokenLogprob
from gateway.api.openai.logprob_bodies import chat_logprobs, completion_logprobs
from gateway.serving.generation import Generation
from gateway.serving.tools import ToolCall

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

    text_offsets: dict[int, int] = field(default_factory=dict)
    """Characters of each legacy choice's text sent so far (its logprobs' ``text_offset``)."""

    def role(self, index: int) -> bytes:
        return self._chunk([self._choice(index, {"role": "assistant", "content": ""}, None)])

    def content(self, index: int, text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> bytes:
        return self._chunk([self._choice(index, {"content": text}, None, logprobs)])

    def tool_call_started(self, index: int, call_index: int, call_id: str, name: str) -> bytes:
        call = {"index": call_index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return self._chunk([self._choice(index, {"tool_calls": [call]}, None)])

    def tool_call_arguments(self, index: int, call_index: int, fragment: str) -> bytes:
        call = {"index": call_index, "function": {"arguments": fragment}}
        return self._chunk([self._choice(index, {"tool_calls": [call]}, None)])

    def finish(self, index: int, reason: str, logprobs: tuple[TokenLogprob, ...] = ()) -> bytes:
        return self._chunk([self._choice(index, {} if self.kind == "chat" else {"content": ""}, reason, logprobs)])

    def usage(self, generation: Generation) -> bytes:
        return sse(self._envelope([]) | {"usage": usage(generation)})

    def _choice(
        self, index: int, delta: dict[str, Any], reason: str | None, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> dict[str, Any]:
        if self.kind == "chat":
            shaped = chat_logprobs(logprobs) if logprobs else None
            return {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": reason}
        text = delta.get("content", "")
        offset = self.text_offsets.get(index, 0)
        self.text_offsets[index] = offset + len(text)
        shaped = completion_logprobs(logprobs, offset) if logprobs else None
        return {"index": index, "text": text, "logprobs": shaped, "finish_reason": reason}


@dataclass
class ChoiceReply:
    """What one choice of a non-streamed response holds once generation has ended."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    """``None`` when the request did not ask for log-probabilities."""
    finish_reason: str | None = None


def tool_calls_body(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls
    ]


def chat_body(generation: Generation, model: str, replies: dict[int, ChoiceReply]) -> dict[str, Any]:
    def message(reply: ChoiceReply) -> dict[str, Any]:
        body: dict[str, Any] = {"role": "assistant", "content": reply.text, "refusal": None}
        if reply.tool_calls:
            body["content"] = reply.text or None
            body["tool_calls"] = tool_calls_body(reply.tool_calls)
        logprobs = None if reply.logprobs is None else chat_logprobs(reply.logprobs)
        return {"message": body, "logprobs": logprobs}

    return _body("chat", "chat.completion", generation, model, replies, message)


def text_body(generation: Generation, model: str, replies: dict[int, ChoiceReply]) -> dict[str, Any]:
    def text(reply: ChoiceReply) -> dict[str, Any]:
        logprobs = None if reply.logprobs is None else completion_logprobs(reply.logprobs)
        return {"text": reply.text, "logprobs": logprobs}

    return _body("text", "text_completion", generation, model, replies, text)


def _body(
    kind: Kind,
    object_name: str,
    generation: Generation,
    model: str,
    replies: dict[int, ChoiceReply],
    content: Callable[[ChoiceReply], dict[str, Any]],
) -> dict[str, Any]:
    """A whole (non-streamed) response: one choice per ``n``, each in ``content``'s shape."""
    choices = []
    for i in range(generation.n):
        reply = replies.get(i) or ChoiceReply()
        choices.append({"index": i, **content(reply), "finish_reason": reply.finish_reason})
    return {
        "id": new_id(kind),
        "object": object_name,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(generation),
    }
