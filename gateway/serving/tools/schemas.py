"""The tools' ``parameters`` JSON schemas: checking them, validating arguments against them, and
placing them inside the larger schema a call grammar is built from.

Requests carry the schemas, so they are checked once (``check_tools``) before anything relies on
them: a schema ``jsonschema`` cannot read would make every call look invalid, and one llguidance
cannot compile would fail only when ``tool_choice`` forces a call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import llguidance

# jsonschema ships no type information; ``Any`` is what these two give strict code.
from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]
from jsonschema.validators import validator_for  # type: ignore[import-untyped]

from gateway.serving.tools import FunctionTool


class ToolSchemaError(ValueError):
    """A tool definition the gateway cannot use (answered with 400, ``param`` ``tools``)."""


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str) -> Any:
    schema = json.loads(schema_text)
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _schema_text(tool: FunctionTool) -> str:
    # The cache key: a tool's schema is a (mutable, unhashable) dict, its JSON text is neither.
    return json.dumps(tool.parameters, sort_keys=True)


def arguments_valid(tool: FunctionTool, arguments: Any) -> bool:
    """Whether ``arguments`` (parsed JSON) is an object that ``tool.parameters`` accepts."""
    if not isinstance(arguments, dict):
        return False
    try:
        return bool(_validator(_schema_text(tool)).is_valid(arguments))
    except Exception:
        # A schema that could not be checked (an unresolvable reference, a bad ``pattern``) cannot
        # vouch for the arguments; ``check_tools`` turns such schemas away before generation.
        return False


def rebased_schema(tool: FunctionTool, pointer: str) -> dict[str, Any]:
    """``tool.parameters`` ready to sit at JSON pointer ``pointer`` of a larger schema.

    Local references (``#/$defs/...``, ``#``) are relative to the document root, so they are
    prefixed with ``pointer``; ``$schema`` is only meaningful at a root and is dropped; and the
    arguments are always an object (a call's arguments are, and the call streamer relies on it).
    """
    schema = _rebase(tool.parameters, pointer)
    assert isinstance(schema, dict)
    schema.pop("$schema", None)
    schema.setdefault("type", "object")
    return schema


def _rebase(value: Any, pointer: str) -> Any:
    if isinstance(value, dict):
        return {
            key: pointer + item[1:]
            if key == "$ref" and isinstance(item, str) and item.startswith("#")
            else _rebase(item, pointer)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rebase(item, pointer) for item in value]
    return value


def check_tools(tools: Sequence[FunctionTool]) -> None:
    """Raise :class:`ToolSchemaError` unless every tool can be offered to a model.

    Names must be unique; each ``parameters`` must be a JSON schema for an object that
    ``jsonschema`` can validate with and llguidance can compile into a call grammar.
    """
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise ToolSchemaError(f"tools: the function name {tool.name!r} appears more than once")
        seen.add(tool.name)
        kind = tool.parameters.get("type", "object")
        if kind != "object":
            raise ToolSchemaError(f"tools: the parameters of {tool.name!r} must describe an object, not {kind!r}")
        try:
            _validator(_schema_text(tool))
        except SchemaError as exc:
            raise ToolSchemaError(
                f"tools: the parameters of {tool.name!r} are not a valid JSON schema: {exc.message}"
            ) from exc
        grammar = llguidance.LLMatcher.grammar_from_json_schema(rebased_schema(tool, "#"))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ToolSchemaError(f"tools: the parameters of {tool.name!r} are not supported: {messages[0]}")
