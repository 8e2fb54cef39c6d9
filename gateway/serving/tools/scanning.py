"""Splitting a reply into content and tool calls, as its text arrives.

One scanner serves both a streamed reply (fed piece by piece) and a whole one (fed once), so the
two always agree. A format only describes where its call blocks begin (``markers``) and how one
block is read (``match_block``); the scanner holds back text that may still become a call and
releases everything else as content at once.

Content is the text outside calls, verbatim, except the whitespace (and the format's other
separators) between content and a call, which belongs to the call layout.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from gateway.serving.tools import FunctionTool
from gateway.serving.tools.schemas import arguments_valid

WHITESPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """A call read from a reply: a known tool, and arguments its schema accepts."""

    name: str
    arguments: str
    """The arguments as JSON text (``json.dumps(..., ensure_ascii=False)`` of what the model wrote)."""


@dataclass(frozen=True, slots=True)
class ParsedReply:
    content: str
    """The text outside calls; a call that did not hold up (bad JSON, unknown tool, arguments
    the schema rejects) stays here as the text the model wrote."""
    calls: tuple[ParsedCall, ...]


class Scan(enum.Enum):
    NEED_MORE = "need more"
    """The text so far may still become a block."""
    NO_BLOCK = "no block"
    """No block starts here: the marker is content."""


@dataclass(frozen=True, slots=True)
class Block:
    """A block's extent, ``text[:end]``, and its calls as (name, arguments) values as parsed,
    or ``None`` when the block is delimited but its inside is not a list of calls."""

    end: int
    calls: tuple[tuple[Any, Any], ...] | None


class BlockSyntax(Protocol):
    """What the scanner needs from a format."""

    @property
    def markers(self) -> tuple[str, ...]:
        """Texts that open a call block anywhere in a reply."""

    @property
    def start_markers(self) -> tuple[str, ...]:
        """Texts that open a call block only where no content precedes it."""

    @property
    def separators(self) -> str:
        """Characters written between a call and what follows it."""

    def match_block(self, text: str, final: bool) -> Block | Scan:
        """Read the block ``text`` starts with (it starts with a marker); ``final``: no more text comes."""


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def load_json(text: str) -> tuple[bool, Any]:
    """(True, value) for strict JSON text (no ``NaN``/``Infinity``), else (False, None)."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return False, None


def json_extent(text: str, start: int) -> int | None:
    """Where the JSON object or array opening at ``text[start]`` ends (exclusive), counting
    brackets outside strings; ``None`` while it is still open. Whether the text between is
    JSON is for :func:`load_json` to say."""
    depth = 0
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


Segment = str | ParsedCall


class ReplyScanner:
    """Reply text in, content pieces and validated calls out, in order.

    With no tools nothing is held back: every piece is content.
    """

    def __init__(self, syntax: BlockSyntax, tools: Sequence[FunctionTool]) -> None:
        self._syntax = syntax
        self._tools = {tool.name: tool for tool in tools}
        self._buffer = ""
        self._held_space = ""
        self._after_call = False
        self._content_seen = False

    def feed(self, text: str) -> list[Segment]:
        self._buffer += text
        return self._scan(final=False)

    def finish(self) -> list[Segment]:
        out = self._scan(final=True)
        if self._held_space and not self._after_call:
            out.append(self._held_space)
        self._held_space = ""
        return out

    def _scan(self, final: bool) -> list[Segment]:
        out: list[Segment] = []
        while self._buffer:
            start = self._block_start() if self._tools else None
            if start is None:
                self._content(self._buffer, out)
                self._buffer = ""
                break
            self._content(self._buffer[:start], out)
            self._buffer = self._buffer[start:]
            if not self._starts_with_marker():
                if not final:
                    break  # the end of the text may be the beginning of a marker
                self._content(self._buffer, out)
                self._buffer = ""
                break
            result = self._syntax.match_block(self._buffer, final)
            if result is Scan.NEED_MORE and not final:
                break
            if isinstance(result, Block):
                calls = self._validated(result.calls)
                if calls is None:
                    self._content(self._buffer[: result.end], out)
                else:
                    self._held_space = ""
                    self._after_call = True
                    out.extend(calls)
                self._buffer = self._buffer[result.end :]
            else:
                # Not a block here: its first character is content, and a block may start later.
                self._content(self._buffer[0], out)
                self._buffer = self._buffer[1:]
        return out

    def _block_start(self) -> int | None:
        text = self._buffer
        found: list[int] = []
        for marker in self._syntax.markers:
            index = text.find(marker)
            if index >= 0:
                found.append(index)
            else:
                partial = next(
                    (k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0
                )
                if partial:
                    found.append(len(text) - partial)
        if not self._content_seen:
            index = len(text) - len(text.lstrip(self._syntax.separators))
            rest = text[index:]
            if rest and any(rest.startswith(m) or m.startswith(rest) for m in self._syntax.start_markers):
                found.append(index)
        return min(found, default=None)

    def _starts_with_marker(self) -> bool:
        text = self._buffer
        if any(text.startswith(m) for m in self._syntax.markers):
            return True
        return not self._content_seen and any(text.startswith(m) for m in self._syntax.start_markers)

    def _content(self, text: str, out: list[Segment]) -> None:
        if self._after_call:
            text = text.lstrip(self._syntax.separators)
            if not text:
                return
            self._after_call = False
        text = self._held_space + text
        body = text.rstrip(WHITESPACE)
        self._held_space = text[len(body) :]
        if body:
            out.append(body)
            self._content_seen = True

    def _validated(self, raw: tuple[tuple[Any, Any], ...] | None) -> list[ParsedCall] | None:
        if not raw:
            return None
        calls: list[ParsedCall] = []
        for name, arguments in raw:
            tool = self._tools.get(name) if isinstance(name, str) else None
            if tool is None or not arguments_valid(tool, arguments):
                return None
            calls.append(ParsedCall(name, json.dumps(arguments, ensure_ascii=False)))
        return calls


def scan_reply(syntax: BlockSyntax, tools: Sequence[FunctionTool], text: str) -> ParsedReply:
    """A whole reply's content and calls."""
    scanner = ReplyScanner(syntax, tools)
    segments = [*scanner.feed(text), *scanner.finish()]
    content = "".join(s for s in segments if isinstance(s, str))
    return ParsedReply(content, tuple(s for s in segments if isinstance(s, ParsedCall)))
