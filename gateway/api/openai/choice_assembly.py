"""From one choice's generation events to what its client sees: content, tool calls, logprobs.

Streamed and whole responses go through the same assembler, so both give the same calls, the
same content and the same finish reason for the same generated text.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import TokenLogprob
from gateway.api.openai.response_bodies import ChoiceReply
from gateway.serving.generation import ChoiceEvent
from gateway.serving.registry import ToolPlan
from gateway.serving.tools.stream import ContentDelta, ToolCallArguments, ToolCallStarted, ToolCallStream


@dataclass(frozen=True, slots=True)
class Content:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


Piece = Content | ToolCallStarted | ToolCallArguments | Finished
"""What a choice gives out next; the tool-call pieces are the tool stream's own events."""


class ChoiceAssembler:
    """One choice's output, piece by piece, and the whole of it (``reply``) at the end."""

    def __init__(self, tools: ToolPlan | None, *, logprobs: bool, prefix: str = "") -> None:
        """``prefix`` is text the choice starts with before anything generated (``echo``)."""
        self._calls = (
            ToolCallStream(tools.format, tools.tools, forced=tools.choice.mode == "required")
            if tools is not None
            else None
        )
        self._prefix = prefix
        self._pending_logprobs: tuple[TokenLogprob, ...] = ()
        self.reply = ChoiceReply(logprobs=() if logprobs else None)

    def feed(self, event: ChoiceEvent) -> list[Piece]:
        logprobs = self._pending_logprobs + event.prompt_logprobs + event.logprobs
        self._pending_logprobs = ()
        if self.reply.logprobs is not None:
            self.reply.logprobs += event.prompt_logprobs + event.logprobs
        pieces: list[Piece] = []
        text = self._prefix + event.text
        self._prefix = ""
        if self._calls is None:
            if text or logprobs:
                pieces.append(Content(text, logprobs))
                logprobs = ()
        else:
            pieces.extend(self._tool_pieces(self._calls.feed(text) if text else []))
            if event.finish_reason is not None:
                pieces.extend(self._tool_pieces(self._calls.finish()))
            # Log-probabilities ride on the first content piece; a reply held back (a call
            # being written) carries them on its finish.
            for index, piece in enumerate(pieces):
                if isinstance(piece, Content) and logprobs:
                    pieces[index] = Content(piece.text, logprobs)
                    logprobs = ()
                    break
        self.reply.text += "".join(p.text for p in pieces if isinstance(p, Content))
        if event.finish_reason is None:
            self._pending_logprobs = logprobs
            return pieces
        reason: str = event.finish_reason
        if self._calls is not None and self._calls.calls:
            self.reply.tool_calls = tuple(self._calls.calls)
            if reason == "stop":
                reason = "tool_calls"
        self.reply.finish_reason = reason
        pieces.append(Finished(reason, logprobs))
        return pieces

    @staticmethod
    def _tool_pieces(events: list[ContentDelta | ToolCallStarted | ToolCallArguments]) -> list[Piece]:
        return [Content(event.text) if isinstance(event, ContentDelta) else event for event in events]
