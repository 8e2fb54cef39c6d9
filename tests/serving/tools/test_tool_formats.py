from __future__ import annotations

import json
from pathlib import Path

import llguidance
import pytest

from gateway.serving.tokenizers import load_chat_template
from gateway.serving.tools import FunctionTool, ToolCall, ToolChoice
from gateway.serving.tools.formats import FORMATS, ParsedCall, ParsedReply, ToolCallFormat, detect_format
from gateway.serving.tools.schemas import ToolSchemaError, check_tools
from gateway.settings import embedded_model

WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
TIME = FunctionTool("get_time")
TOOLS = [WEATHER, TIME]
CALLS = [ToolCall("call_1", "get_weather", '{"city": "Zürich", "days": 3}'), ToolCall("call_2", "get_time", "{}")]
PARSED = (ParsedCall("get_weather", '{"city": "Zürich", "days": 3}'), ParsedCall("get_time", "{}"))

HERMES, LLAMA3, MISTRAL = FORMATS["hermes"], FORMATS["llama3"], FORMATS["mistral"]


def test_formats_by_name() -> None:
    assert sorted(FORMATS) == ["hermes", "llama3", "mistral"]
    assert all(name == f.name for name, f in FORMATS.items())


def test_render_hermes() -> None:
    assert HERMES.render(CALLS) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )


def test_render_llama3_and_mistral() -> None:
    assert LLAMA3.render(CALLS[:1]) == '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}'
    assert LLAMA3.render(CALLS) == (
        '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}; {"name": "get_time", "parameters": {}}'
    )
    assert MISTRAL.render(CALLS) == (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}},'
        ' {"name": "get_time", "arguments": {}}]'
    )


def test_render_normalizes_arguments_and_keeps_non_json_as_a_string() -> None:
    calls = [ToolCall("a", "get_weather", '{"city":"Paris"}'), ToolCall("b", "get_time", "not json")]
    assert HERMES.render(calls) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "not json"}\n</tool_call>'
    )
    assert HERMES.render([]) == ""


@pytest.mark.parametrize("format", FORMATS.values(), ids=FORMATS.keys())
def test_render_parse_round_trip(format: ToolCallFormat) -> None:
    assert format.parse(format.render(CALLS), TOOLS) == ParsedReply("", PARSED)
    assert format.parse(format.render(CALLS[1:]), TOOLS) == ParsedReply("", PARSED[1:])


@pytest.mark.parametrize("format", [HERMES, MISTRAL], ids=["hermes", "mistral"])
def test_content_around_calls(format: ToolCallFormat) -> None:
    text = f"Let me check.\n\n{format.render(CALLS)}\nDone."
    assert format.parse(text, TOOLS) == ParsedReply("Let me check.Done.", PARSED)


def test_content_without_calls_is_verbatim() -> None:
    for format in FORMATS.values():
        text = "  Paris is the capital of France.\n\n{not a call}\n"
        assert format.parse(text, TOOLS) == ParsedReply(text, ())


@pytest.mark.parametrize(
    "call",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}',  # unbalanced
        '{"name": "get_weather", "arguments": {"city": Paris}}',  # not JSON
        '{"name": "get_weather", "arguments": {"city": NaN}}',  # not strict JSON
        '{"name": "get_wether", "arguments": {"city": "Paris"}}',  # unknown tool
        '{"name": "get_weather", "arguments": {"town": "Paris"}}',  # the schema rejects it
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 0}}',  # the schema rejects it
        '{"name": "get_weather", "arguments": ["Paris"]}',  # not an object
        '{"arguments": {"city": "Paris"}}',  # no name
    ],
)
def test_invalid_calls_stay_content(call: str) -> None:
    text = f"<tool_call>\n{call}\n</tool_call>"
    assert HERMES.parse(text, TOOLS) == ParsedReply(text, ())
    assert MISTRAL.parse(f"[TOOL_CALLS][{call}]", TOOLS) == ParsedReply(f"[TOOL_CALLS][{call}]", ())
    assert LLAMA3.parse(call.replace('"arguments"', '"parameters"'), TOOLS).calls == ()


def test_an_invalid_call_stays_content_beside_a_valid_one() -> None:
    bad = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    text = f"{bad}\n{HERMES.render(CALLS[:1])}"
    assert HERMES.parse(text, TOOLS) == ParsedReply(bad, PARSED[:1])


def test_hermes_reads_what_models_write() -> None:
    # Compact JSON, extra blank lines, and a reply that ends before its closing tag.
    text = '<tool_call>\n{"name":"get_time","arguments":{}}\n\n</tool_call>\n<tool_call>{"name": "get_time"}'
    assert HERMES.parse(text, TOOLS).calls == (PARSED[1], PARSED[1])
    # Arguments given as JSON text are read too.
    text = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}\n</tool_call>'
    assert HERMES.parse(text, TOOLS).calls == (ParsedCall("get_weather", '{"city": "Bern"}'),)
    # Something other than the closing tag after the object: not a call.
    text = '<tool_call>\n{"name": "get_time", "arguments": {}}\nand more'
    assert HERMES.parse(text, TOOLS) == ParsedReply(text, ())
    text = "I would write <tool_call> here."
    assert HERMES.parse(text, TOOLS) == ParsedReply(text, ())


def test_llama3_calls_are_whole_replies() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}}'
    assert LLAMA3.parse(f"  {call}\n", TOOLS) == ParsedReply("", PARSED[:1])
    assert LLAMA3.parse(f"<|python_tag|>{call}", TOOLS) == ParsedReply("", PARSED[:1])
    two = '{"name": "get_time", "arguments": {}}'
    assert LLAMA3.parse(f"{call}; {two}", TOOLS).calls == PARSED
    assert LLAMA3.parse(f"{call}\n{two}", TOOLS).calls == PARSED
    # JSON inside an answer is the answer.
    assert LLAMA3.parse(f"Here: {call}", TOOLS) == ParsedReply(f"Here: {call}", ())


def test_mistral_forms() -> None:
    assert MISTRAL.parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 3}', TOOLS).calls == PARSED[:1]
    text = '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Zürich", "days": 3}[TOOL_CALLS]get_time[ARGS]{}'
    assert MISTRAL.parse(text, TOOLS) == ParsedReply("", PARSED)
    for text in ("[TOOL_CALLS]get_weather", "[TOOL_CALLS]get_weather[ARGS]", "[TOOL_CALLS] hello", "[TOOL_CALLS][]"):
        assert MISTRAL.parse(text, TOOLS) == ParsedReply(text, ())
    # One bad call makes the whole list content.
    text = '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, {"name": "nope", "arguments": {}}]'
    assert MISTRAL.parse(text, TOOLS) == ParsedReply(text, ())


def test_no_tools_no_calls() -> None:
    text = HERMES.render(CALLS)
    assert HERMES.parse(text, []) == ParsedReply(text, ())


HERMES_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>"
LLAMA3_TEMPLATE = '{% if tools %}{{ "<|python_tag|>" }}{{ tools }}{% endif %}ipython'
MISTRAL_TEMPLATE = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"


def test_detect_format() -> None:
    assert detect_format(HERMES_TEMPLATE) is HERMES
    assert detect_format(LLAMA3_TEMPLATE) is LLAMA3
    assert detect_format(MISTRAL_TEMPLATE) is MISTRAL
    assert detect_format('{% for t in tools %}{"name": ..., "parameters": ...}{% endfor %}') is LLAMA3
    assert detect_format("{% for t in tools %}<function={{ t.name }}>{% endfor %}") is None
    assert detect_format("<tool_call>") is None  # mentions no tools: cannot render them
    assert detect_format(None) is None
    assert detect_format(load_chat_template(embedded_model())) is None  # SmolLM2's ChatML


# Grammars: llguidance compiles them, and they accept what render writes and nothing else.


@pytest.fixture(scope="module")
def lltokenizer(llama2_tokenizer_dir: Path) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(str(llama2_tokenizer_dir / "tokenizer.json"))


def compiled(lark: str) -> str:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar) == (False, [])
    return grammar


def accepts(lark: str, text: str, tokenizer: llguidance.LLTokenizer) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, compiled(lark), log_level=0)
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


REQUIRED = ToolChoice("required")
NAMED = ToolChoice("required", "get_weather")


@pytest.mark.parametrize("format", FORMATS.values(), ids=FORMATS.keys())
def test_grammar_accepts_rendered_calls(format: ToolCallFormat, lltokenizer: llguidance.LLTokenizer) -> None:
    one, two = format.render(CALLS[:1]), format.render(CALLS)
    assert accepts(format.lark_grammar(TOOLS, REQUIRED, parallel=False), one, lltokenizer)
    assert accepts(format.lark_grammar(TOOLS, REQUIRED, parallel=False), format.render(CALLS[1:]), lltokenizer)
    assert not accepts(format.lark_grammar(TOOLS, REQUIRED, parallel=False), two, lltokenizer)
    assert accepts(format.lark_grammar(TOOLS, REQUIRED, parallel=True), two, lltokenizer)
    assert accepts(format.lark_grammar(TOOLS, REQUIRED, parallel=True), one, lltokenizer)
    assert accepts(format.lark_grammar(TOOLS, NAMED, parallel=False), one, lltokenizer)
    assert not accepts(format.lark_grammar(TOOLS, NAMED, parallel=True), two, lltokenizer)
    assert not accepts(format.lark_grammar(TOOLS, NAMED, parallel=False), format.render(CALLS[1:]), lltokenizer)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"Zürich"}}\n</tool_call>',  # not the layout
        '<tool_call>\n{"arguments": {"city": "Zürich"}, "name": "get_weather"}\n</tool_call>',  # name comes first
        '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Zürich"}}\n</tool_call>',  # the schema
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}, "x": 1}\n</tool_call>',  # extra key
        '<tool_call>\n{"name": "get_weather"}\n</tool_call>',  # arguments required
        'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',  # content
    ],
)
def test_grammar_rejects(text: str, lltokenizer: llguidance.LLTokenizer) -> None:
    assert not accepts(HERMES.lark_grammar(TOOLS, REQUIRED, parallel=True), text, lltokenizer)


def test_grammar_forces_the_layout_up_to_the_arguments(lltokenizer: llguidance.LLTokenizer) -> None:
    matcher = llguidance.LLMatcher(lltokenizer, compiled(HERMES.lark_grammar(TOOLS, NAMED, parallel=False)))
    assert matcher.compute_ff_bytes().decode() == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "'


def test_grammar_with_references_and_unicode(lltokenizer: llguidance.LLTokenizer) -> None:
    tool = FunctionTool(
        "route",
        "Wegbeschreibung für Fußgänger",
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/place"}, "to": {"$ref": "#/$defs/place"}},
            "required": ["from", "to"],
            "$defs": {"place": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
        },
    )
    call = ToolCall(
        "c", "route", json.dumps({"from": {"name": "Zürich"}, "to": {"name": "Genève"}}, ensure_ascii=False)
    )
    for format in FORMATS.values():
        assert format.parse(format.render([call]), [tool]).calls == (ParsedCall("route", call.arguments),)
        assert accepts(format.lark_grammar([tool], REQUIRED, parallel=False), format.render([call]), lltokenizer)
        bad = ToolCall("c", "route", json.dumps({"from": {"name": "Zürich"}, "to": {}}))
        assert not accepts(format.lark_grammar([tool], REQUIRED, parallel=False), format.render([bad]), lltokenizer)


def test_grammar_needs_a_forcing_choice() -> None:
    with pytest.raises(ValueError, match="does not force"):
        HERMES.lark_grammar(TOOLS, ToolChoice("auto"), parallel=False)
    with pytest.raises(ValueError, match="'get_news'"):
        HERMES.lark_grammar(TOOLS, ToolChoice("required", "get_news"), parallel=False)
    with pytest.raises(ValueError, match="a tool"):
        HERMES.lark_grammar([], REQUIRED, parallel=False)


def test_check_tools() -> None:
    check_tools(TOOLS)
    with pytest.raises(ToolSchemaError, match="more than once"):
        check_tools([TIME, TIME])
    with pytest.raises(ToolSchemaError, match="describe an object"):
        check_tools([FunctionTool("f", None, {"type": "string"})])
    with pytest.raises(ToolSchemaError, match="not a valid JSON schema"):
        check_tools([FunctionTool("f", None, {"type": "object", "properties": {"a": {"type": 5}}})])
    with pytest.raises(ToolSchemaError, match="not supported"):
        check_tools([FunctionTool("f", None, {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}})])
