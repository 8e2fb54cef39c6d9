"""Grammars a reply must follow: ``response_format``, the ``guided_*`` extension fields and
forced tool calls, compiled once by llguidance for every backend.

llguidance compiles JSON schemas, regular expressions and Lark grammars into one grammar form
that the local engines enforce token by token (a mask over the vocabulary before each sample).
A schema keyword it does not implement is an error, never silently dropped: a client asking
for ``"not"`` or ``"if"`` gets a 400 that names the keyword rather than JSON that ignores it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from backends.base import Constraint

JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
"""JSON as ``json.dumps`` writes it. Free whitespace lets a small model pad a reply with blank
lines until it runs out of tokens; one fixed spacing keeps every token on the content."""

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class ConstraintError(ValueError):
    """The client's schema, regex or grammar cannot be enforced (answered with 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _checked(grammar: str, what: str, param: str, source: Mapping[str, object]) -> Constraint:
    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, RuntimeError, TypeError) as exc:  # input the compiler's bindings refuse outright
        raise ConstraintError(f"The {what} cannot be enforced: {exc}", param) from exc
    if is_error:
        detail = messages[0].strip() if messages else "it does not compile"
        raise ConstraintError(f"The {what} cannot be enforced: {detail}", param)
    return Constraint(grammar=grammar, source=source, param=param)


def json_schema_constraint(schema: Mapping[str, Any], *, param: str) -> Constraint:
    """Replies valid against ``schema``, written as compact one-line JSON."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(dict(schema), defaults=JSON_STYLE)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"The JSON schema is not valid: {exc}", param) from exc
    return _checked(grammar, "JSON schema", param, {"guided_json": dict(schema)})


def json_object_constraint(*, param: str = "response_format") -> Constraint:
    """``response_format: {"type": "json_object"}``: any JSON object."""
    return json_schema_constraint(ANY_JSON_OBJECT, param=param)


def regex_constraint(regex: str, *, param: str = "guided_regex") -> Constraint:
    return _checked(LLMatcher.grammar_from_regex(regex), "regular expression", param, {"guided_regex": regex})


def lark_constraint(lark: str, *, param: str = "guided_grammar") -> Constraint:
    """A Lark grammar in llguidance's dialect (which embeds JSON schemas with ``%json``)."""
    return _checked(LLMatcher.grammar_from_lark(lark), "grammar", param, {"guided_grammar": lark})


def schema_text(schema: Mapping[str, Any]) -> str:
    """A schema as one JSON line, as grammars embed it."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
