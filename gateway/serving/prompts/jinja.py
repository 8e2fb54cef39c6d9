"""Prompts from a model's own Jinja chat template (GGUF metadata or ``tokenizer_config.json``).

The environment matches the one Hugging Face ``transformers`` renders chat templates in (sandboxed,
``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now`` and a
``tojson`` that keeps non-ASCII text), so templates written for it render the same here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.serving.prompts import Message, PromptError
from gateway.serving.tokenizers import Tokenizer
from gateway.serving.tools.convention import native_tool_messages
from gateway.settings import ConfigError


def _raise_exception(message: str) -> NoReturn:
    raise PromptError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Parse a chat template once; a template that is not valid Jinja is a configuration error."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from exc


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The prompt text the template renders for ``messages``.

    Assistant calls and ``tool`` results reach the template as Hugging Face templates expect
    them (``native_tool_messages``), and ``tools`` (``tool_specs``) as the ``tools`` variable,
    ``None`` when the request offers none, as ``transformers`` passes it.

    A template that rejects the messages (``raise_exception``, or failing on them) raises
    :class:`PromptError`.
    """
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=native_tool_messages(messages),
            tools=list(tools) if tools is not None else None,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as exc:
        raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc


def _marker(index: int) -> str:
    # Private-use characters never occur in chat text in practice, and no template changes them.
    return f"\ue000{index}\ue001"


def _render_with_content_spans(
    template: str, messages: Sequence[Message], tokenizer: Tokenizer, tools: Sequence[dict[str, Any]] | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered prompt and where each message's content lies in it.

    Rendered with a marker in place of each (non-empty) content, then the contents put back,
    each as written or JSON-escaped (a template may write a content with ``tojson``), whichever
    the real rendering has there. A template that transforms contents (or branches on them)
    does not give back its own rendering that way; then the whole text counts as the
    template's and no span is known. Empty contents keep no marker: templates test contents for
    emptiness (an assistant turn that only calls tools), and an empty text needs no span.
    """
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    contents: dict[str, str] = {}
    marked_messages: list[Message] = []
    for index, message in enumerate(messages):
        if message.content:
            contents[_marker(index)] = message.content
            message = replace(message, content=_marker(index))
        marked_messages.append(message)
    marked = render_chat_template(template, marked_messages, bos_token=bos, eos_token=eos, tools=tools)
    real = render_chat_template(template, messages, bos_token=bos, eos_token=eos, tools=tools)
    pieces = re.split("(\ue000\\d+\ue001)", marked)
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for index, piece in enumerate(pieces):
        content = contents.get(piece) if index % 2 else None
        if content is None:
            parts.append(piece)
            length += len(piece)
            continue
        if not real.startswith(content, length):
            escaped = json.dumps(content, ensure_ascii=False)[1:-1]
            if real.startswith(escaped, length):
                content = escaped
        spans.append((length, length + len(content)))
        parts.append(content)
        length += len(content)
    text = "".join(parts)
    # Put back, the contents must give exactly what the template renders from them.
    return (text, spans) if text == real else (real, [])


def build_jinja_prompt(
    template: str,
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    *,
    tools: Sequence[dict[str, Any]] | None = None,
) -> list[int]:
    """The prompt ids: the rendered template, with special-token text parsed only where the
    template wrote it.

    Text a user typed (``<|im_end|>``, ``</s>``) stays characters and cannot forge a turn or a
    control token; that holds for every message's content, tool results included. Calls'
    arguments and the ``tools`` are data the template formats (``tojson``), not contents: special
    token text in them is parsed as the template's, as ``transformers`` would. Otherwise the ids
    equal tokenizing the whole rendered text with special tokens parsed (as ``transformers``
    does): the text is cut at the template's special tokens and each piece between them is
    tokenized as plain text. BOS is present only where the template renders it.
    """
    text, spans = _render_with_content_spans(template, messages, tokenizer, tools)
    if not tokenizer.special_texts:
        return tokenizer.encode(text)
    special = re.compile("|".join(re.escape(t) for t in tokenizer.special_texts))
    ids: list[int] = []
    start = 0
    # Spans come in text order and matches too: one walk over both keeps this linear in the
    # message count (a check against every span per match made 10,000 messages take seconds).
    span_ends = iter(spans)
    span = next(span_ends, None)
    for match in special.finditer(text):
        while span is not None and span[1] <= match.start():
            span = next(span_ends, None)
        if span is not None and span[0] <= match.start():
            continue  # inside a message: plain text
        if match.start() > start:
            ids.extend(tokenizer.encode(text[start : match.start()]))
        ids.extend(tokenizer.encode_with_special(match.group()))
        start = match.end()
    if start < len(text):
        ids.extend(tokenizer.encode(text[start:]))
    return ids
