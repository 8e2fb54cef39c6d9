"""The text formats models write tool calls in.

Each format knows three things about its calls: how past calls are written into a prompt
(``render``), how a reply is read back into content and calls (``parse``), and the grammar that
forces a reply to be calls (``lark_grammar``, llguidance's Lark dialect). All three follow one
``CallLayout``, so a rendered call parses back to itself and is exactly what the grammar allows.

- ``hermes``: Hermes, Qwen 2.5/3, SmolLM3, and the gateway's own prompt convention::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``llama3``: Llama 3.1/3.2/3.3 JSON tool calling, ``{"name": ..., "parameters": {...}}``, the
  whole reply (optionally after ``<|python_tag|>``); several calls separated by ``;`` or newlines.
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``; the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` is read too.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.serving.tools import FunctionTool, ToolCall, ToolChoice
from gateway.serving.tools.scanning import (
    WHITESPACE,
    Block,
    ParsedCall,
    ParsedReply,
    Scan,
    json_extent,
    load_json,
    scan_reply,
)
from gateway.serving.tools.schemas import rebased_schema

__all__ = [
    "FORMATS",
    "CallLayout",
    "HermesFormat",
    "Llama3Format",
    "MistralFormat",
    "ParsedCall",
    "ParsedReply",
    "ToolCallFormat",
    "allowed_tools",
    "detect_format",
]

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
"""llguidance's JSON output options for forced calls: ``json.dumps``'s default separators, no
other whitespace, so generated calls look like rendered ones."""


@dataclass(frozen=True, slots=True)
class CallLayout:
    """The exact text of a list of calls: ``before``, the call objects joined by ``between``,
    ``after``. Each call object is ``{"name": "<name>", "<key>": <arguments>}``."""

    before: str
    between: str
    after: str
    key: str

    def call_opening(self, first: bool) -> str:
        """The text from the end of the previous call (or the reply's start) up to the name."""
        return (self.before if first else self.between) + '{"name": "'

    @property
    def name_closing(self) -> str:
        """The text between the name and the arguments."""
        return f'", "{self.key}": '


def _arguments_value(arguments: str) -> Any:
    # History comes from clients: arguments that are not JSON are kept as a JSON string.
    ok, value = load_json(arguments)
    return value if ok else arguments


def _call_fields(value: Any, keys: tuple[str, ...]) -> tuple[Any, Any] | None:
    """(name, arguments) of one call object, arguments given as an object or as JSON text of one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: Any = next((value[key] for key in keys if key in value), {})
    if isinstance(arguments, str):
        ok, arguments = load_json(arguments)
        if not ok:
            return None
    return value["name"], arguments


def _skip(text: str, index: int, chars: str = WHITESPACE) -> int:
    while index < len(text) and text[index] in chars:
        index += 1
    return index


def allowed_tools(tools: Sequence[FunctionTool], choice: ToolChoice) -> list[FunctionTool]:
    """The tools a forced reply may call: all of them, or the one ``choice`` names.

    Raises ``ValueError`` when ``choice`` forces nothing (``auto``/``none``) or names no tool.
    """
    if choice.mode != "required":
        raise ValueError(f"tool_choice {choice.mode!r} does not force a call")
    allowed = [t for t in tools if choice.function is None or t.name == choice.function]
    if not allowed:
        wanted = f"the function {choice.function!r}" if choice.function else "a tool"
        raise ValueError(f"tool_choice requires {wanted}, but the request's tools do not have it")
    return allowed


def _lark_string(text: str) -> str:
    return json.dumps(text)


class ToolCallFormat(ABC):
    """A format: its ``layout``, where its call blocks begin, and how one is read."""

    name: ClassVar[str]
    layout: ClassVar[CallLayout]
    markers: ClassVar[tuple[str, ...]] = ()
    start_markers: ClassVar[tuple[str, ...]] = ()
    separators: ClassVar[str] = WHITESPACE
    argument_keys: ClassVar[tuple[str, ...]] = ("arguments",)
    """The keys a parsed call object may carry its arguments under."""

    def render(self, calls: Sequence[ToolCall]) -> str:
        """The assistant text that makes ``calls``, as this format's models write it."""
        if not calls:
            return ""
        layout = self.layout
        objects = [
            f'{{"name": {json.dumps(c.name, ensure_ascii=False)}, '
            f"{json.dumps(layout.key)}: {json.dumps(_arguments_value(c.arguments), ensure_ascii=False)}}}"
            for c in calls
        ]
        return layout.before + layout.between.join(objects) + layout.after

    def parse(self, text: str, tools: Sequence[FunctionTool]) -> ParsedReply:
        """A whole reply's content and the calls in it that name one of ``tools`` with arguments
        its ``parameters`` schema accepts. Anything else that looks like a call stays content."""
        return scan_reply(self, tools, text)

    @abstractmethod
    def match_block(self, text: str, final: bool) -> Block | Scan:
        """Read the call block ``text`` starts with (it starts with a marker); ``final``: no more
        text comes. See :class:`~gateway.serving.tools.scanning.BlockSyntax`."""

    def lark_grammar(self, tools: Sequence[FunctionTool], choice: ToolChoice, parallel: bool) -> str:
        """A grammar (llguidance's Lark dialect) whose only sentences are one call, or with
        ``parallel`` one or more calls, of the tools ``choice`` allows, laid out as ``render`` does.

        Each call object is an inline ``%json`` schema: ``name`` the tool's name as a ``const``,
        the arguments the tool's ``parameters``, both required and nothing else. Raises
        ``ValueError`` as :func:`allowed_tools` does.
        """
        layout = self.layout
        allowed = allowed_tools(tools, choice)
        pointer = f"#/properties/{layout.key}"
        rules = [
            f"call_{index}: %json "
            + json.dumps(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.name}, layout.key: rebased_schema(tool, pointer)},
                    "required": ["name", layout.key],
                    "additionalProperties": False,
                    "x-guidance": JSON_LAYOUT,
                },
                ensure_ascii=False,
            )
            for index, tool in enumerate(allowed)
        ]
        repeat = f" ({_lark_string(layout.between)} call)*" if parallel else ""
        parts = [_lark_string(layout.before)] if layout.before else []
        parts.append("call" + repeat)
        if layout.after:
            parts.append(_lark_string(layout.after))
        start = " ".join(parts)
        alternatives = " | ".join(f"call_{index}" for index in range(len(allowed)))
        return "\n".join([f"start: {start}", f"call: {alternatives}", *rules]) + "\n"

    def _object_block(self, text: str, start: int, end_marker: str, final: bool) -> Block | Scan:
        """A block holding one call object at ``text[start:]`` (after whitespace), then ``end_marker``."""
        start = _skip(text, start)
        if start == len(text):
            return Scan.NEED_MORE
        if text[start] != "{":
            return Scan.NO_BLOCK
        end = json_extent(text, start)
        if end is None:
            return Scan.NEED_MORE
        ok, value = load_json(text[start:end])
        fields = _call_fields(value, self.argument_keys) if ok else None
        calls = (fields,) if fields else None
        if not end_marker:
            return Block(end, calls)
        after = _skip(text, end)
        if text.startswith(end_marker, after):
            return Block(after + len(end_marker), calls)
        if end_marker.startswith(text[after:]):
            # A reply that stops right after the object (the end marker cut off) still made the call.
            return Block(len(text), calls) if final else Scan.NEED_MORE
        return Scan.NO_BLOCK


class HermesFormat(ToolCallFormat):
    name = "hermes"
    layout = CallLayout(
        before="<tool_call>\n", between="\n</tool_call>\n<tool_call>\n", after="\n</tool_call>", key="arguments"
    )
    markers = ("<tool_call>",)

    def match_block(self, text: str, final: bool) -> Block | Scan:
        return self._object_block(text, len("<tool_call>"), "</tool_call>", final)


PYTHON_TAG = "<|python_tag|>"


class Llama3Format(ToolCallFormat):
    name = "llama3"
    layout = CallLayout(before="", between="; ", after="", key="parameters")
    markers = (PYTHON_TAG,)
    start_markers = ("{",)
    separators = WHITESPACE + ";"
    argument_keys = ("parameters", "arguments")

    def match_block(self, text: str, final: bool) -> Block | Scan:
        return self._object_block(text, len(PYTHON_TAG) if text.startswith(PYTHON_TAG) else 0, "", final)


TOOL_CALLS = "[TOOL_CALLS]"
_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_ALPHANUMERIC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class MistralFormat(ToolCallFormat):
    name = "mistral"
    layout = CallLayout(before=TOOL_CALLS + "[", between=", ", after="]", key="arguments")
    markers = (TOOL_CALLS,)

    def match_block(self, text: str, final: bool) -> Block | Scan:
        start = _skip(text, len(TOOL_CALLS))
        if start == len(text):
            return Scan.NEED_MORE
        if text[start] == "[":
            end = json_extent(text, start)
            if end is None:
                return Scan.NEED_MORE
            ok, value = load_json(text[start:end])
            items = value if ok and isinstance(value, list) else []
            fields = [_call_fields(item, self.argument_keys) for item in items]
            calls = tuple(f for f in fields if f is not None)
            return Block(end, calls if calls and len(calls) == len(fields) else None)
        return self._named_block(text, start)

    def _named_block(self, text: str, start: int) -> Block | Scan:
        # Newer Mistral tokenizers: ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``, one call per marker.
        name = _MISTRAL_NAME.match(text, start)
        if name is None:
            return Scan.NO_BLOCK
        index = name.end()
        if text.startswith("[CALL_ID]", index):
            index = _skip(text, index + len("[CALL_ID]"), _ALPHANUMERIC)
        elif "[CALL_ID]".startswith(text[index:]):
            return Scan.NEED_MORE
        if text.startswith("[ARGS]", index):
            index = _skip(text, index + len("[ARGS]"))
        elif "[ARGS]".startswith(text[index:]):
            return Scan.NEED_MORE
        else:
            return Scan.NO_BLOCK
        if index == len(text):
            return Scan.NEED_MORE
        if text[index] != "{":
            return Scan.NO_BLOCK
        end = json_extent(text, index)
        if end is None:
            return Scan.NEED_MORE
        ok, arguments = load_json(text[index:end])
        return Block(end, ((name.group(), arguments),) if ok else None)


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), Llama3Format(), MistralFormat())}
"""The formats by the name the ``tool_call_format`` model option gives."""


def detect_format(chat_template: str | None) -> ToolCallFormat | None:
    """The format a chat template writes tool calls in, from its text.

    ``None`` when the template does not handle tools (never mentions ``tools``), or handles them
    in a format not known here; such models get the gateway's prompt convention (``hermes``).
    """
    if chat_template is None or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return FORMATS["hermes"]
    if TOOL_CALLS in chat_template:
        return FORMATS["mistral"]
    if PYTHON_TAG in chat_template or "ipython" in chat_template or '"parameters"' in chat_template:
        return FORMATS["llama3"]
    return None
