"""Prompt building: chat messages in, prompt token ids out.

Two templates: ``llama-2`` (Meta's reference ``chat_completion``, built as token ids) and
``jinja`` (the model's own chat template from GGUF metadata or ``tokenizer_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.serving.tools import ToolCall

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn with its text already flattened (``developer`` arrives here as ``system``)."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant turn's calls."""
    tool_call_id: str | None = None
    """A ``tool`` turn: the call whose result ``content`` is."""
    name: str | None = None


class PromptError(ValueError):
    """The messages cannot form a prompt for this template (answered with 400)."""

    def __init__(self, message: str, param: str | None = "messages") -> None:
        super().__init__(message)
        self.param = param
