"""Tool calling: the tools a request offers, the calls a reply makes, and the text formats
models write calls in.

A model writes its calls as text in a format of its own (Hermes/Qwen ``<tool_call>``, Llama 3.x
JSON, Mistral ``[TOOL_CALLS]``); ``formats`` renders and parses them and builds the grammar that
forces a call when ``tool_choice`` asks for one, ``convention`` puts tools into prompts whose
template knows none (and shapes them for templates that do), and ``stream`` turns generated text
into content and calls. Underneath, ``scanning`` splits a reply into content and calls for both
``parse`` and ``stream``, and ``schemas`` checks the tools' JSON schemas and validates arguments.

Where a request goes:

- prompt: a template that handles tools (``formats.detect_format`` finds its format, or the
  ``tool_call_format`` model option names one) renders ``convention.native_tool_messages`` with
  ``tools=convention.tool_specs(...)``; any other gets ``convention.apply_tool_convention`` and
  the ``hermes`` format.
- generation: ``tool_choice`` ``required`` or a named function runs under
  ``format.lark_grammar(...)``; ``auto`` runs free; ``none`` offers no tools and reads no calls.
- reply: ``stream.ToolCallStream(format, tools, forced=...)`` for streamed and whole replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ToolChoiceMode = Literal["none", "auto", "required"]


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """One function a request offers the model (OpenAI's ``tools[i].function``)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the assistant made: in a request's history, or parsed from a reply."""

    id: str
    name: str
    arguments: str
    """The arguments as JSON text, as OpenAI carries them."""


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``tool_choice``: a mode, or one named function (then ``mode`` is ``required``)."""

    mode: ToolChoiceMode = "auto"
    function: str | None = None
