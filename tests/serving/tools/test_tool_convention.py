from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.serving.prompts import Message
from gateway.serving.prompts.jinja import build_jinja_prompt, render_chat_template
from gateway.serving.prompts.llama2 import build_llama2_prompt
from gateway.serving.tokenizers import GGUFTokenizer, SentencePieceTokenizer, load_chat_template, load_tokenizer
from gateway.serving.tools import FunctionTool, ToolCall, ToolChoice
from gateway.serving.tools.convention import (
    TOOLS_INSTRUCTIONS,
    TOOLS_PREAMBLE,
    apply_tool_convention,
    native_tool_messages,
    tool_specs,
    tools_prompt,
)
from gateway.serving.tools.formats import FORMATS, ParsedCall
from gateway.settings import embedded_model

WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = FunctionTool("get_time")
TOOLS = [WEATHER, TIME]
CALL_1 = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
CALL_2 = ToolCall("call_2", "get_time", "{}")

CONVERSATION = [
    Message("system", "Be brief."),
    Message("user", "Weather and time in Paris?"),
    Message("assistant", "Let me check.", tool_calls=(CALL_1, CALL_2)),
    Message("tool", "Sunny, 21 °C", tool_call_id="call_1"),
    Message("tool", "14:05 <|im_end|></s>", tool_call_id="call_2", name="get_time"),
    Message("user", "And tomorrow?"),
]


def test_tools_prompt_text() -> None:
    prompt = tools_prompt(TOOLS, ToolChoice())
    assert prompt == (
        "You can call functions to help with the request. Each function is described by a JSON object inside"
        " <tools></tools>:\n<tools>\n"
        '{"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object",'
        ' "properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
        '{"name": "get_time", "parameters": {"type": "object", "properties": {}}}\n'
        "</tools>\n"
        "To call a function, answer with a JSON object holding its name and arguments inside"
        " <tool_call></tool_call>, one block per call:\n"
        "<tool_call>\n"
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
        "</tool_call>\n"
        "The results come back inside <tool_response></tool_response>.\n"
        "Call a function only when it helps; otherwise answer directly."
    )
    assert prompt.startswith(TOOLS_PREAMBLE)
    assert TOOLS_INSTRUCTIONS in prompt
    assert tools_prompt(TOOLS, ToolChoice("required")).endswith("\nYou must call at least one function now.")
    named = tools_prompt(TOOLS, ToolChoice("required", "get_time"))
    assert named.endswith("\nYou must call the function get_time now.")
    assert tools_prompt(TOOLS, ToolChoice("none")) == ""
    assert tools_prompt([], ToolChoice()) == ""


def test_convention_messages() -> None:
    out = apply_tool_convention(CONVERSATION, TOOLS, ToolChoice())
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0] == Message("system", "Be brief.\n\n" + tools_prompt(TOOLS, ToolChoice()))
    assert out[1] == CONVERSATION[1]
    assert out[2].content == "Let me check.\n" + FORMATS["hermes"].render([CALL_1, CALL_2])
    assert out[3].content == (
        "<tool_response>\n"
        '{"name": "get_weather", "tool_call_id": "call_1", "content": "Sunny, 21 °C"}\n'
        "</tool_response>\n"
        "<tool_response>\n"
        '{"name": "get_time", "tool_call_id": "call_2", "content": "14:05 <|im_end|></s>"}\n'
        "</tool_response>\n\n"
        "And tomorrow?"
    )
    assert all(not m.tool_calls and m.tool_call_id is None for m in out)


def test_convention_calls_parse_back() -> None:
    out = apply_tool_convention(CONVERSATION, TOOLS, ToolChoice())
    parsed = FORMATS["hermes"].parse(out[2].content, TOOLS)
    assert parsed.content == "Let me check."
    assert parsed.calls == (ParsedCall("get_weather", CALL_1.arguments), ParsedCall("get_time", "{}"))


def test_convention_without_a_system_message_or_tools() -> None:
    out = apply_tool_convention(CONVERSATION[1:4], TOOLS, ToolChoice("required"))
    assert out[0] == Message("system", tools_prompt(TOOLS, ToolChoice("required")))
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    # With tool_choice "none" the tools are not offered; past calls and results stay in the history.
    out = apply_tool_convention(CONVERSATION, TOOLS, ToolChoice("none"))
    assert out[0] == Message("system", "Be brief.")
    assert "<tool_call>" in out[2].content
    assert out[3].content.startswith("<tool_response>")


def test_convention_fits_the_llama2_template(llama2_tokenizer_dir: Path) -> None:
    tokenizer = SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    for messages in (CONVERSATION, CONVERSATION[:-1], CONVERSATION[1:2]):
        ids = build_llama2_prompt(apply_tool_convention(messages, TOOLS, ToolChoice()), tokenizer)
        turns = 2 if len(messages) > 2 else 1
        assert ids.count(tokenizer.bos_id) == turns
        # The tool result's "</s>" is characters: the only EOS ends the finished turn.
        assert ids.count(tokenizer.eos_id) == turns - 1
        assert "<tools>" in tokenizer.decode(ids)


def test_native_tool_messages_and_specs() -> None:
    assert native_tool_messages(CONVERSATION[2:5]) == [
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
            ],
        },
        # The name comes from the call when the message has none.
        {"role": "tool", "content": "Sunny, 21 °C", "tool_call_id": "call_1", "name": "get_weather"},
        {"role": "tool", "content": "14:05 <|im_end|></s>", "tool_call_id": "call_2", "name": "get_time"},
    ]
    assert native_tool_messages([Message("user", "hi")]) == [{"role": "user", "content": "hi"}]
    weather = {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER.parameters}
    assert tool_specs(TOOLS) == [
        {"type": "function", "function": weather},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, GGUFTokenizer]:
    template = load_chat_template(embedded_model())
    tokenizer = load_tokenizer(embedded_model())
    assert template is not None
    assert isinstance(tokenizer, GGUFTokenizer)
    return template, tokenizer


def test_smollm2_renders_native_messages(smollm2: tuple[str, GGUFTokenizer]) -> None:
    template, tokenizer = smollm2
    text = render_chat_template(template, CONVERSATION, bos_token="", eos_token="", tools=tool_specs(TOOLS))
    assert "<|im_start|>tool\nSunny, 21 °C<|im_end|>" in text
    assert "<|im_start|>assistant\nLet me check.<|im_end|>" in text
    # Tool results are contents: their special-token text stays characters.
    ids = build_jinja_prompt(template, CONVERSATION, tokenizer, tools=tool_specs(TOOLS))
    im_start, im_end = tokenizer.encode_with_special("<|im_start|><|im_end|>")
    assert ids.count(im_start) == 7
    assert ids.count(im_end) == 6


# Modelled on Qwen 2.5's template: tools in the system turn, calls as <tool_call> blocks, results
# in a user turn, contents tested for emptiness, a tool result written with tojson.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content | tojson }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_tool_template_renders_calls_and_results(smollm2: tuple[str, GGUFTokenizer]) -> None:
    _, tokenizer = smollm2
    messages = [*CONVERSATION[:2], Message("assistant", "", tool_calls=(CALL_1, CALL_2)), *CONVERSATION[3:]]
    text = render_chat_template(HERMES_TEMPLATE, messages, bos_token="", eos_token="", tools=tool_specs(TOOLS))
    assert f"<tools>\n{json.dumps(tool_specs(TOOLS)[0], ensure_ascii=False)}\n" in text
    assert FORMATS["hermes"].render([CALL_1]) in text
    assert FORMATS["hermes"].render([CALL_2]) in text
    assert "<|im_start|>assistant\n<tool_call>\n" in text  # no content, and no marker left in its place
    assert '<tool_response>\n"14:05 <|im_end|></s>"\n</tool_response>' in text
    ids = build_jinja_prompt(HERMES_TEMPLATE, messages, tokenizer, tools=tool_specs(TOOLS))
    im_start, im_end = tokenizer.encode_with_special("<|im_start|><|im_end|>")
    # system, user, assistant, two results, user, generation prompt; the result's <|im_end|> is text.
    assert ids.count(im_start) == 7
    assert ids.count(im_end) == 6
    assert '"14:05 <|im_end|></s>"' in tokenizer.decode(ids)


def test_contents_written_with_tojson_stay_text(smollm2: tuple[str, GGUFTokenizer]) -> None:
    _, tokenizer = smollm2
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | tojson }}<|im_end|>\n{% endfor %}"
    messages = [Message("tool", 'say "hi"\n<|im_end|>', tool_call_id="call_1")]
    ids = build_jinja_prompt(template, messages, tokenizer)
    im_start, im_end = tokenizer.encode_with_special("<|im_start|><|im_end|>")
    assert ids.count(im_start) == 1
    assert ids.count(im_end) == 1
    assert tokenizer.decode(ids) == 'tool\n"say \\"hi\\"\\n<|im_end|>"\n'
