"""What a request asks of the reply beyond sampling: a grammar, tool calls, log-probabilities.

Each is checked against the model's backend before admission, so a request the backend cannot
honour gets a 400 naming the field, never a reply that quietly ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import Constraint
from gateway.api.openai.request_bodies import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    ToolDefinition,
    unsupported,
)
from gateway.errors import echo, invalid_request
from gateway.serving.constraints import (
    ConstraintError,
    json_object_constraint,
    json_schema_constraint,
    lark_constraint,
    regex_constraint,
)
from gateway.serving.registry import ModelRuntime, ToolPlan
from gateway.serving.tools import FunctionTool, ToolChoice
from gateway.serving.tools.schemas import ToolSchemaError, check_tools


@dataclass(frozen=True, slots=True)
class OutputControls:
    constraint: Constraint | None = None
    tools: ToolPlan | None = None
    """Tools the reply may call; ``None`` when the request offers none (or ``tool_choice`` is none)."""
    logprobs: int | None = None
    prompt_logprobs: int | None = None


def _format_fields(fields: SamplingFields) -> list[str]:
    """The fields that ask for a grammar: ``response_format`` (other than text) and ``guided_*``."""
    return [
        name
        for name, value in (
            ("response_format", fields.response_format is not None and fields.response_format.type != "text"),
            ("guided_json", fields.guided_json is not None),
            ("guided_regex", fields.guided_regex is not None),
            ("guided_grammar", fields.guided_grammar is not None),
        )
        if value
    ]


def _format_constraint(fields: SamplingFields) -> Constraint | None:
    """The grammar named by ``response_format`` or one ``guided_*`` field (at most one of them)."""
    given = _format_fields(fields)
    if len(given) > 1:
        raise invalid_request(f"Only one of {', '.join(given)} may be set.", param=given[1])
    if not given:
        return None
    try:
        if fields.guided_json is not None:
            return json_schema_constraint(fields.guided_json, param="guided_json")
        if fields.guided_regex is not None:
            return regex_constraint(fields.guided_regex)
        if fields.guided_grammar is not None:
            return lark_constraint(fields.guided_grammar)
        return _response_format_constraint(fields)
    except ConstraintError as exc:
        raise invalid_request(str(exc), param=exc.param, code="invalid_schema") from exc


def _response_format_constraint(fields: SamplingFields) -> Constraint:
    response_format = fields.response_format
    assert response_format is not None
    if response_format.type == "json_object":
        return json_object_constraint()
    if response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None or spec.schema is None:
            raise invalid_request(
                "response_format of type json_schema needs json_schema.schema.", param="response_format.json_schema"
            )
        return json_schema_constraint(spec.schema, param="response_format.json_schema.schema")
    raise invalid_request(
        f"Invalid response_format type {echo(response_format.type)!r}: expected text, json_object or json_schema.",
        param="response_format.type",
    )


def _function_tools(tools: list[ToolDefinition]) -> tuple[FunctionTool, ...]:
    functions: dict[str, FunctionTool] = {}
    for index, tool in enumerate(tools):
        if tool.type != "function":
            raise invalid_request(
                f"Tool {index} has type {echo(tool.type)!r}; only function tools are supported.",
                param=f"tools.[{index}].type",
            )
        function = tool.function
        if function.name in functions:
            raise invalid_request(
                f"Tool name {function.name!r} is given twice.", param=f"tools.[{index}].function.name"
            )
        parameters = function.parameters if function.parameters is not None else {"type": "object", "properties": {}}
        functions[function.name] = FunctionTool(function.name, function.description, parameters, bool(function.strict))
    offered = tuple(functions.values())
    try:
        check_tools(offered)
    except ToolSchemaError as exc:
        raise invalid_request(str(exc), param="tools", code="invalid_schema") from exc
    return offered


def _tool_choice(request: ChatCompletionRequest, tools: tuple[FunctionTool, ...]) -> ToolChoice:
    choice = request.tool_choice
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice != "none" and not tools:
            raise invalid_request(f"tool_choice {choice!r} needs tools.", param="tool_choice")
        return ToolChoice(choice)
    if choice.type != "function":
        raise invalid_request(f"Invalid tool_choice type {echo(choice.type)!r}.", param="tool_choice.type")
    if choice.function.name not in {t.name for t in tools}:
        raise invalid_request(
            f"tool_choice names function {echo(choice.function.name)!r}, which is not among the tools.",
            param="tool_choice.function.name",
        )
    return ToolChoice("required", choice.function.name)


def _tool_plan(request: ChatCompletionRequest, runtime: ModelRuntime) -> ToolPlan | None:
    if request.functions:
        raise unsupported("functions", "The deprecated 'functions' field (use 'tools')")
    tools = _function_tools(request.tools or [])
    choice = _tool_choice(request, tools)
    if choice.mode == "none":
        return None
    tool_format, native = runtime.tool_prompting
    parallel = request.parallel_tool_calls is not False
    return ToolPlan(tools, choice, parallel, tool_format, native)


def _tool_constraint(plan: ToolPlan) -> Constraint | None:
    if plan.choice.mode != "required":
        return None
    allowed = tuple(t for t in plan.tools if plan.choice.function in (None, t.name))
    lark = plan.format.lark_grammar(allowed, plan.choice, plan.parallel)
    try:
        return lark_constraint(lark, param="tools")
    except ConstraintError as exc:
        raise invalid_request(str(exc), param="tools", code="invalid_schema") from exc


def _check_backend(runtime: ModelRuntime, *, grammar: str | None, logprobs: bool, prompt_logprobs: bool) -> None:
    """Refuse what the model's backend cannot do, before any grammar is compiled for it."""
    caps = runtime.backend.capabilities
    if grammar is not None and not caps.supports_constraints:
        raise unsupported(grammar, "Structured output on this model")
    if logprobs and not caps.supports_logprobs:
        raise unsupported("logprobs", "logprobs on this model")
    if prompt_logprobs and not caps.supports_prompt_logprobs:
        raise unsupported("echo", "echo with logprobs on this model")


def chat_output_controls(request: ChatCompletionRequest, runtime: ModelRuntime) -> OutputControls:
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid_request("top_logprobs may only be set when logprobs is true.", param="top_logprobs")
    plan = _tool_plan(request, runtime)
    forced = plan is not None and plan.choice.mode == "required"
    formats = _format_fields(request)
    if plan is not None and formats:
        raise invalid_request(
            "response_format together with tools is not supported; use tool_choice 'none' for a formatted "
            "reply, or leave response_format out to let the model call tools.",
            param=formats[0],
        )
    grammar_param = "tool_choice" if forced else (formats[0] if formats else None)
    _check_backend(runtime, grammar=grammar_param, logprobs=bool(request.logprobs), prompt_logprobs=False)
    constraint = _tool_constraint(plan) if plan is not None else _format_constraint(request)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return OutputControls(constraint, plan, logprobs)


def completion_output_controls(request: CompletionRequest, runtime: ModelRuntime) -> OutputControls:
    logprobs = request.logprobs
    prompt_logprobs = logprobs if request.echo and logprobs is not None else None
    formats = _format_fields(request)
    _check_backend(
        runtime,
        grammar=formats[0] if formats else None,
        logprobs=logprobs is not None,
        prompt_logprobs=prompt_logprobs is not None,
    )
    return OutputControls(_format_constraint(request), None, logprobs, prompt_logprobs)
