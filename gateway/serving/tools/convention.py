"""Tools in prompts: the gateway's own convention for templates that know no tools, and the
message dicts for templates that do.

A template that cannot render tools (``llama-2``, or a Jinja template that never mentions
``tools``, such as SmolLM2's ChatML) gets them from :func:`apply_tool_convention` as plain
system, user and assistant messages: the tools are described in the system message, past calls
are written in the ``hermes`` format, and results come back in ``<tool_response>`` blocks inside
a user turn. The model then answers in the ``hermes`` format too.

A template that renders tools itself gets :func:`native_tool_messages` and :func:`tool_specs`:
the shapes Hugging Face chat templates are written for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.serving.prompts import Message
from gateway.serving.tools import FunctionTool, ToolCall, ToolChoice
from gateway.serving.tools.formats import FORMATS

TOOLS_PREAMBLE = (
    "You can call functions to help with the request. Each function is described by a JSON object"
    " inside <tools></tools>:\n<tools>\n"
)
"""Opens the tools' description; one JSON object per line follows (``name``, ``description``
when the tool has one, ``parameters``), then :data:`TOOLS_INSTRUCTIONS`."""

TOOLS_INSTRUCTIONS = (
    "\n</tools>\n"
    "To call a function, answer with a JSON object holding its name and arguments inside"
    " <tool_call></tool_call>, one block per call:\n"
    "<tool_call>\n"
    '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n'
    "</tool_call>\n"
    "The results come back inside <tool_response></tool_response>."
)

CHOICE_INSTRUCTIONS = {
    "auto": "\nCall a function only when it helps; otherwise answer directly.",
    "required": "\nYou must call at least one function now.",
}
"""The closing line per ``tool_choice``; a named function gets :data:`NAMED_INSTRUCTION`."""

NAMED_INSTRUCTION = "\nYou must call the function {name} now."

_CONVENTION = FORMATS["hermes"]


def tools_prompt(tools: Sequence[FunctionTool], choice: ToolChoice) -> str:
    """The system text that offers ``tools``; empty when there are none or ``choice`` is ``none``."""
    if not tools or choice.mode == "none":
        return ""
    lines = []
    for tool in tools:
        spec: dict[str, Any] = {"name": tool.name}
        if tool.description:
            spec["description"] = tool.description
        spec["parameters"] = tool.parameters
        lines.append(json.dumps(spec, ensure_ascii=False))
    closing = NAMED_INSTRUCTION.format(name=choice.function) if choice.function else CHOICE_INSTRUCTIONS[choice.mode]
    return TOOLS_PREAMBLE + "\n".join(lines) + TOOLS_INSTRUCTIONS + closing


def _call_names(messages: Sequence[Message]) -> dict[str, str]:
    return {call.id: call.name for m in messages for call in m.tool_calls}


def _tool_response(message: Message, names: dict[str, str]) -> str:
    result: dict[str, Any] = {}
    name = message.name or names.get(message.tool_call_id or "")
    if name:
        result["name"] = name
    if message.tool_call_id:
        result["tool_call_id"] = message.tool_call_id
    result["content"] = message.content
    return f"<tool_response>\n{json.dumps(result, ensure_ascii=False)}\n</tool_response>"


def apply_tool_convention(
    messages: Sequence[Message], tools: Sequence[FunctionTool], choice: ToolChoice
) -> list[Message]:
    """``messages`` as plain system/user/assistant messages that carry the tools, the calls and
    their results in the gateway's convention.

    The tools' description follows the first system message's text (or becomes the first
    system message). An assistant turn's calls follow its text in the ``hermes`` format. A run of
    ``tool`` messages becomes one user turn of ``<tool_response>`` blocks, which also takes in a
    user message right after it, so roles still alternate as ``llama-2`` requires.
    """
    names = _call_names(messages)
    out: list[Message] = []
    results_open = False  # the last turn in ``out`` is tool results
    for message in messages:
        if message.role == "tool":
            text = _tool_response(message, names)
            if results_open:
                out[-1] = Message("user", f"{out[-1].content}\n{text}")
            else:
                out.append(Message("user", text))
            results_open = True
            continue
        if message.role == "user" and results_open:
            out[-1] = Message("user", f"{out[-1].content}\n\n{message.content}")
        elif message.role == "assistant" and message.tool_calls:
            calls = _CONVENTION.render(message.tool_calls)
            out.append(Message("assistant", f"{message.content}\n{calls}" if message.content else calls))
        else:
            out.append(Message(message.role, message.content))
        results_open = False
    system = tools_prompt(tools, choice)
    if not system:
        return out
    if out and out[0].role == "system":
        merged = f"{out[0].content}\n\n{system}" if out[0].content else system
        return [Message("system", merged), *out[1:]]
    return [Message("system", system), *out]


def _arguments(call: ToolCall) -> Any:
    # Templates write ``arguments | tojson``: they expect the object, not its JSON text.
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def native_tool_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The message dicts Hugging Face chat templates expect, calls and tool results included."""
    names = _call_names(messages)
    out: list[dict[str, Any]] = []
    for message in messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c)}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            entry["tool_call_id"] = message.tool_call_id
            name = message.name or names.get(message.tool_call_id or "")
            if name:
                entry["name"] = name
        out.append(entry)
    return out


def tool_specs(tools: Sequence[FunctionTool]) -> list[dict[str, Any]]:
    """The ``tools`` a Hugging Face chat template is rendered with."""
    specs: list[dict[str, Any]] = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        function["parameters"] = tool.parameters
        specs.append({"type": "function", "function": function})
    return specs
