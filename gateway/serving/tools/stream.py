"""Generated text in, content and tool-call events out: for streamed and whole replies alike.

A reply whose ``tool_choice`` lets the model choose (``auto``) may hold calls anywhere; text that
may begin one is held back until the call is complete and checked like ``ToolCallFormat.parse``
checks it, then announced whole (or released as content). A reply forced by the format's grammar
(``tool_choice`` ``required`` or a named function) is nothing but calls laid out exactly as the
format's ``CallLayout`` says, so each call is announced as soon as its name is complete and its
arguments stream as they are generated: there the arguments are the model's text as generated
(the grammar keeps it compact, valid JSON), and ``calls`` reports that same text.

A whole reply is fed once and finished; it gets the same content and calls a stream gets.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.serving.tools import FunctionTool, ToolCall
from gateway.serving.tools.formats import ToolCallFormat
from gateway.serving.tools.scanning import ParsedCall, ReplyScanner


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    index: int
    fragment: str


StreamEvent = ContentDelta | ToolCallStarted | ToolCallArguments


def new_call_id() -> str:
    """A call id as OpenAI writes them: ``call_`` and 24 URL-safe random characters."""
    return "call_" + secrets.token_urlsafe(18)


class _Phase(enum.Enum):
    OPENING = "the text up to a call's name, or the end of the calls"
    NAME = "the name, up to its closing quote"
    NAME_CLOSING = "the text between the name and the arguments"
    ARGUMENTS = "the arguments object"
    CLOSING = "the call object's closing brace"


class ToolCallStream:
    """Feed it generated text; it answers with events. ``calls`` lists the calls made so far.

    ``forced``: the reply was generated under ``format.lark_grammar`` and so is calls only.
    Should the text leave the layout anyway (a backend that could not apply the grammar), the
    rest of the reply is read as in ``auto`` mode.
    """

    def __init__(self, format: ToolCallFormat, tools: Sequence[FunctionTool], *, forced: bool) -> None:
        self._format = format
        self._tools = tools
        self._calls: list[ToolCall] = []
        self._scanner = None if forced else ReplyScanner(format, tools)
        self._pending = ""
        self._unannounced = ""
        self._phase = _Phase.OPENING
        self._call_id = self._call_name = ""
        self._arguments: list[str] = []
        self._depth = 0
        self._in_string = self._escaped = False

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def feed(self, text: str) -> list[StreamEvent]:
        if self._scanner is not None:
            return self._announce(self._scanner.feed(text))
        self._pending += text
        return self._forced()

    def finish(self) -> list[StreamEvent]:
        """The events the end of the reply releases; call once, after the last ``feed``."""
        if self._scanner is None:
            # Still inside the layout: the reply ended where the grammar allows it to, or was cut
            # short (max_tokens). A started call keeps the arguments it has (finish_reason says it
            # was cut); what else is pending is markup, never content.
            if self._phase in (_Phase.NAME_CLOSING, _Phase.ARGUMENTS, _Phase.CLOSING):
                self._close_call()
            self._pending = self._unannounced = ""
            self._phase = _Phase.OPENING
            return []
        return self._announce(self._scanner.finish())

    def _announce(self, segments: Sequence[str | ParsedCall]) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for segment in segments:
            if isinstance(segment, str):
                events.append(ContentDelta(segment))
                continue
            index = len(self._calls)
            call = ToolCall(new_call_id(), segment.name, segment.arguments)
            self._calls.append(call)
            events += [ToolCallStarted(index, call.id, call.name), ToolCallArguments(index, call.arguments)]
        return events

    def _forced(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        layout = self._format.layout
        while self._scanner is None:
            if self._phase is _Phase.OPENING:
                opening = layout.call_opening(first=not self._calls)
                if self._pending.startswith(opening):
                    self._consume(len(opening), _Phase.NAME)
                    continue
                possible = opening.startswith(self._pending)
                if self._calls and layout.after.startswith(self._pending):
                    possible = True
                if not possible:
                    events += self._leave_layout()
                break
            if self._phase is _Phase.NAME:
                end = self._pending.find('"')
                if end < 0:
                    break
                self._call_id, self._call_name = new_call_id(), self._pending[:end]
                self._pending, self._unannounced = self._pending[end:], ""
                events.append(ToolCallStarted(len(self._calls), self._call_id, self._call_name))
                self._phase = _Phase.NAME_CLOSING
                continue
            if self._phase is _Phase.ARGUMENTS:
                if not self._arguments and self._pending and self._pending[0] != "{":
                    events += self._leave_layout()
                    break
                fragment = self._arguments_text()
                if fragment:
                    self._arguments.append(fragment)
                    events.append(ToolCallArguments(len(self._calls), fragment))
                if self._phase is _Phase.ARGUMENTS:
                    break
                continue
            literal = layout.name_closing if self._phase is _Phase.NAME_CLOSING else "}"
            if self._pending.startswith(literal):
                if self._phase is _Phase.CLOSING:
                    self._close_call()
                self._consume(len(literal), _Phase.ARGUMENTS if self._phase is _Phase.NAME_CLOSING else _Phase.OPENING)
                continue
            if not literal.startswith(self._pending):
                events += self._leave_layout()
            break
        return events

    def _consume(self, length: int, phase: _Phase) -> None:
        if phase is _Phase.NAME:
            self._unannounced = self._pending[:length]
        self._pending = self._pending[length:]
        self._phase = phase

    def _arguments_text(self) -> str:
        """The pending text that belongs to the arguments, consumed; the phase moves on at their end."""
        text = self._pending
        for index, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._pending = text[index + 1 :]
                    self._phase = _Phase.CLOSING
                    return text[: index + 1]
        self._pending = ""
        return text

    def _close_call(self) -> None:
        self._calls.append(ToolCall(self._call_id, self._call_name, "".join(self._arguments)))
        self._arguments = []
        self._depth = 0
        self._in_string = self._escaped = False

    def _leave_layout(self) -> list[StreamEvent]:
        """The text left the forced layout: a started call ends with the arguments it has, and
        the rest is read as an ``auto`` reply."""
        if self._phase in (_Phase.NAME_CLOSING, _Phase.ARGUMENTS, _Phase.CLOSING):
            self._close_call()
        self._scanner = ReplyScanner(self._format, self._tools)
        rest, self._pending, self._unannounced = self._unannounced + self._pending, "", ""
        self._phase = _Phase.OPENING
        return self._announce(self._scanner.feed(rest))
