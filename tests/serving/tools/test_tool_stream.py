from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import llguidance
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.serving.tools import FunctionTool, ToolCall, ToolChoice
from gateway.serving.tools.formats import FORMATS, ParsedReply, ToolCallFormat
from gateway.serving.tools.stream import (
    ContentDelta,
    StreamEvent,
    ToolCallArguments,
    ToolCallStarted,
    ToolCallStream,
    new_call_id,
)

WEATHER = FunctionTool(
    "get_weather",
    None,
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = FunctionTool("get_time")
TOOLS = [WEATHER, TIME]
CALLS = [ToolCall("x", "get_weather", '{"city": "Zü\\"ri}ch"}'), ToolCall("y", "get_time", "{}")]
HERMES, LLAMA3, MISTRAL = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]


def replies(format: ToolCallFormat) -> list[str]:
    """Replies in ``format``: plain, with calls, with calls that do not hold up, cut short."""
    calls = format.render(CALLS)
    return [
        "The capital of France is Paris.\n",
        calls,
        format.render(CALLS[:1]),
        f"Let me look.\n{calls}\nThere.",
        f"{calls} {format.render([ToolCall('z', 'unknown', '{}')])}",
        format.render([ToolCall("z", "get_weather", '{"town": "Bern"}')]),
        calls[: len(calls) // 2],
        calls[:-1],
        f"{{ <tool_call [TOOL_CALLS <|python_tag| <tool_call>\n{{ {calls}",
    ]


ALL_REPLIES = [(format, text) for format in FORMATS.values() for text in replies(format)]


def run(stream: ToolCallStream, pieces: Sequence[str]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for piece in pieces:
        events += stream.feed(piece)
    return events + stream.finish()


def outcome(events: Sequence[StreamEvent]) -> tuple[str, list[tuple[str, str]]]:
    """The content and the (name, arguments) of each call the events describe, checking their order."""
    content = ""
    calls: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content += event.text
        elif isinstance(event, ToolCallStarted):
            assert event.index == len(calls)
            assert re.fullmatch(r"call_[A-Za-z0-9_-]{24}", event.id)
            calls.append((event.name, ""))
        else:
            assert event.index == len(calls) - 1
            name, arguments = calls[-1]
            calls[-1] = (name, arguments + event.fragment)
    return content, calls


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@pytest.mark.parametrize(("format", "text"), ALL_REPLIES)
def test_whole_reply_matches_parse(format: ToolCallFormat, text: str) -> None:
    stream = ToolCallStream(format, TOOLS, forced=False)
    content, calls = outcome(run(stream, [text]))
    parsed = format.parse(text, TOOLS)
    assert ParsedReply(content, tuple(parsed.calls)) == parsed
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    assert [(c.name, c.arguments) for c in stream.calls] == calls


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_REPLIES), st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_pieces_do_not_change_the_outcome(reply: tuple[ToolCallFormat, str], cuts: list[int]) -> None:
    format, text = reply
    whole = outcome(run(ToolCallStream(format, TOOLS, forced=False), [text]))
    stream = ToolCallStream(format, TOOLS, forced=False)
    assert outcome(run(stream, split(text, cuts))) == whole
    assert [(c.name, c.arguments) for c in stream.calls] == whole[1]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ALL_REPLIES), st.lists(st.integers(min_value=0, max_value=200), max_size=30))
def test_forced_pieces_do_not_change_the_outcome(reply: tuple[ToolCallFormat, str], cuts: list[int]) -> None:
    format, text = reply
    whole = ToolCallStream(format, TOOLS, forced=True)
    expected = outcome(run(whole, [text]))
    stream = ToolCallStream(format, TOOLS, forced=True)
    assert outcome(run(stream, split(text, cuts))) == expected
    assert [(c.name, c.arguments) for c in stream.calls] == expected[1]


@pytest.mark.parametrize("format", FORMATS.values(), ids=FORMATS.keys())
def test_forced_calls_stream_their_arguments(format: ToolCallFormat) -> None:
    text = format.render(CALLS)
    stream = ToolCallStream(format, TOOLS, forced=True)
    per_char = [stream.feed(char) for char in text]
    per_char.append(stream.finish())
    events = [e for batch in per_char for e in batch]
    assert outcome(events) == ("", [(c.name, c.arguments) for c in CALLS])
    assert [(c.name, c.arguments) for c in stream.calls] == [(c.name, c.arguments) for c in CALLS]
    # The call is announced as soon as its name is complete, and its arguments arrive in pieces.
    started = next(i for i, batch in enumerate(per_char) if batch)
    assert per_char[started] == [ToolCallStarted(0, stream.calls[0].id, "get_weather")]
    assert text[: started + 1].endswith('"get_weather"')
    fragments = [e for e in events if isinstance(e, ToolCallArguments) and e.index == 0]
    assert len(fragments) == len(CALLS[0].arguments)


def test_forced_arguments_are_the_generated_text() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Bern" }}\n</tool_call>'
    stream = ToolCallStream(HERMES, TOOLS, forced=True)
    assert outcome(run(stream, [text])) == ("", [("get_weather", '{"city":"Bern" }')])
    assert stream.calls[0].arguments == '{"city":"Bern" }'


def test_forced_reply_cut_short_keeps_the_started_call() -> None:
    rendered = HERMES.render(CALLS[:1])
    text = rendered[: rendered.index("ri}ch") + 2]
    stream = ToolCallStream(HERMES, TOOLS, forced=True)
    content, calls = outcome(run(stream, [text]))
    assert content == ""
    assert calls == [("get_weather", '{"city": "Zü\\"ri')]
    assert [(c.name, c.arguments) for c in stream.calls] == calls


@pytest.mark.parametrize("format", FORMATS.values(), ids=list(FORMATS))
def test_a_forced_reply_cut_anywhere_has_no_content(format: ToolCallFormat) -> None:
    """max_tokens may end a forced reply at any character: the markup left is never content, and
    every call announced is kept, complete or with the arguments it has."""
    rendered = format.render(CALLS)
    for end in range(len(rendered) + 1):
        stream = ToolCallStream(format, TOOLS, forced=True)
        content, calls = outcome(run(stream, [rendered[:end]]))
        assert content == "", (end, rendered[:end])
        assert [(c.name, c.arguments) for c in stream.calls] == calls
        whole = [(c.name, c.arguments) for c in CALLS]
        for (name, arguments), (whole_name, whole_arguments) in zip(calls, whole, strict=False):
            assert name == whole_name
            assert whole_arguments.startswith(arguments)


def test_forced_reply_that_leaves_the_layout_is_read_like_auto() -> None:
    text = f"Sure!\n{HERMES.render(CALLS[1:])}"
    stream = ToolCallStream(HERMES, TOOLS, forced=True)
    assert outcome(run(stream, [text[:3], text[3:]])) == ("Sure!", [("get_time", "{}")])


def test_auto_holds_back_only_what_may_be_a_call() -> None:
    stream = ToolCallStream(HERMES, TOOLS, forced=False)
    assert stream.feed("Hello <tool") == [ContentDelta("Hello")]
    assert stream.feed("box> there") == [ContentDelta(" <toolbox> there")]
    assert stream.feed("\n<tool_call>\n{") == []
    call = HERMES.render(CALLS[1:])
    events = stream.feed(call[len("<tool_call>\n{") :])
    assert [type(e) for e in events] == [ToolCallStarted, ToolCallArguments]
    assert stream.finish() == []


def test_llama3_holds_back_only_a_reply_that_opens_with_json() -> None:
    stream = ToolCallStream(LLAMA3, TOOLS, forced=False)
    assert stream.feed("Sure {") == [ContentDelta("Sure {")]
    stream = ToolCallStream(LLAMA3, TOOLS, forced=False)
    assert stream.feed(' {"name": "get_time", "parameters": {}') == []
    assert outcome(stream.feed("}") + stream.finish()) == ("", [("get_time", "{}")])


def test_without_tools_everything_is_content() -> None:
    stream = ToolCallStream(HERMES, [], forced=False)
    text = HERMES.render(CALLS)
    assert outcome(run(stream, [text[:5], text[5:]])) == (text, [])


def test_call_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[A-Za-z0-9_-]{24}", i) for i in ids)


# Replies generated under the grammar: random tokens among those llguidance allows.

FORECAST = FunctionTool(
    "forecast",
    None,
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 9},
            "hourly": {"type": "boolean"},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
)
CLOCK = FunctionTool("clock", None, {"type": "object", "properties": {}, "additionalProperties": False})


def generate(grammar: str, tokenizer: llguidance.LLTokenizer, rng: random.Random) -> str | None:
    """A random sentence of ``grammar``, or ``None`` when it grows past a bound."""
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
    tokens: list[int] = []
    while not matcher.is_stopped() and len(tokens) < 300:
        bits = numpy.unpackbits(numpy.frombuffer(matcher.compute_bitmask(), numpy.uint8), bitorder="little")
        # The end of the reply is allowed once a call is complete: take it, or make another call.
        if bits[tokenizer.eos_token] and rng.random() < 0.5:
            return tokenizer.decode_str(tokens)
        bits[tokenizer.eos_token] = 0
        token = rng.choice(numpy.flatnonzero(bits[: tokenizer.vocab_size]).tolist())
        assert matcher.consume_token(token)
        tokens.append(token)
    return tokenizer.decode_str(tokens) if matcher.is_accepting() else None


@pytest.mark.parametrize("format", FORMATS.values(), ids=FORMATS.keys())
def test_generated_forced_replies_are_calls(format: ToolCallFormat, llama2_tokenizer_dir: Path) -> None:
    tokenizer = llguidance.LLTokenizer(str(llama2_tokenizer_dir / "tokenizer.json"))
    grammar = format.lark_grammar([FORECAST, CLOCK], ToolChoice("required"), parallel=True)
    rng = random.Random(7)
    done = 0
    for _ in range(12):
        text = generate(grammar, tokenizer, rng)
        if text is None:
            continue
        done += 1
        stream = ToolCallStream(format, [FORECAST, CLOCK], forced=True)
        content, calls = outcome(run(stream, split(text, [rng.randrange(len(text)) for _ in range(8)])))
        parsed = format.parse(text, [FORECAST, CLOCK])
        assert content == parsed.content == ""
        assert [name for name, _ in calls] == [c.name for c in parsed.calls]
        assert [json.loads(arguments) for _, arguments in calls] == [json.loads(c.arguments) for c in parsed.calls]
    assert done >= 6
