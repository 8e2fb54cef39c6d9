"""Prompts from a model's own Jinja chat template (GGUF metadata or ``tokenizer_config.json``).

The environment matches the one Hugging Face ``transformers`` renders chat templates in (sandboxed,
``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now`` and a
``tojson`` that keeps non-ASCII text), so templates written for it render the same here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.prompts import Message, PromptError
from gateway.settings import ConfigError
from gateway.tokenizers import Tokenizer


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
) -> str:
    """The prompt text the template renders for ``messages``.

    A template that rejects the messages (``raise_exception``, or failing on them) raises
    :class:`PromptError`.
    """
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as exc:
        raise PromptError(f"the model's chat template rejected the messages: {exc}") from exc


def build_jinja_prompt(template: str, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The prompt ids: the rendered template with its special-token text parsed into ids.

    BOS is present only where the template renders it, as with ``transformers``' tokenized
    ``apply_chat_template``. Special-token text is parsed in the whole rendered text, message contents
    included, as ``transformers`` and the llama.cpp server both do; the llama-2 template is the one
    that keeps user text plain by construction.
    """
    text = render_chat_template(template, messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return tokenizer.encode_with_special(text)
