"""Prompt token ids for a prediction, built the way the OpenAI path builds a chat request's.

- A plain ``prompt`` is one user message after the system prompt.
- A ``prompt`` written as a Llama-2 dialogue (``[INST] … [/INST] answer [INST] … [/INST]``, as the
  hosted model's page shows) becomes those messages, with a leading ``<<SYS>>`` block as the system
  message. Textual ``<s>``/``</s>`` markers around turns are dropped: BOS and EOS come as ids.
- A prompt that starts with the tags but is not such a dialogue (one ending in an answer to continue,
  say) is kept as it is: BOS, then the text tokenized as plain text. Tags elsewhere in a prompt are
  just text of the user's message.
- A custom ``prompt_template`` is rendered as text and tokenized as plain text after BOS.

Plain text never yields control tokens, so no input can forge BOS or EOS.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gateway.api.replicate.inputs import LLAMA2_DEFAULT_SYSTEM_PROMPT, PredictionInput
from gateway.api.replicate.problems import invalid
from gateway.serving.prompts import Message, PromptError
from gateway.serving.prompts.jinja import build_jinja_prompt
from gateway.serving.prompts.llama2 import B_INST, E_INST, build_llama2_prompt
from gateway.serving.registry import ModelRuntime
from gateway.settings import ConfigError

_TAGS = re.compile(rf"({re.escape(B_INST)}|{re.escape(E_INST)})")
_SYSTEM_BLOCK = re.compile(r"\s*<<SYS>>\n?(.*?)\n?<</SYS>>\s*(.*)", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{(prompt|system_prompt)\}")
_BOS_TEXT, _EOS_TEXT = "<s>", "</s>"


def _without_markers(answer: str) -> str:
    """An answer between turns without the ``</s><s>`` text that may close it."""
    text = answer.strip()
    text = text.removesuffix(_BOS_TEXT).rstrip()
    return text.removesuffix(_EOS_TEXT).strip()


def writes_format(prompt: str) -> bool:
    """Whether the prompt starts in Llama-2's chat format, ``[INST]`` after an optional ``<s>``."""
    return prompt.lstrip().removeprefix(_BOS_TEXT).lstrip().startswith(B_INST)


def parse_dialogue(prompt: str) -> list[Message] | None:
    """The messages of a prompt written in Llama-2's chat format; None when it is not one.

    A dialogue starts with ``[INST]`` (after an optional ``<s>``), alternates user turns and answers,
    and ends with ``[/INST]``: the model answers the last user turn.
    """
    if not writes_format(prompt):
        return None
    parts = _TAGS.split(prompt)
    # [lead, B_INST, user, E_INST, answer, B_INST, user, E_INST, tail]
    if len(parts) < 5 or (len(parts) - 1) % 4:
        return None
    if parts[1::4] != [B_INST] * ((len(parts) - 1) // 4) or parts[3::4] != [E_INST] * ((len(parts) - 1) // 4):
        return None
    if parts[0].strip() not in ("", _BOS_TEXT) or parts[-1].strip():
        return None
    users = [u.strip() for u in parts[2::4]]
    answers = [_without_markers(a) for a in parts[4:-1:4]]
    messages: list[Message] = []
    first = users[0]
    block = _SYSTEM_BLOCK.fullmatch(first)
    if block is not None:
        messages.append(Message("system", block.group(1).strip()))
        first = block.group(2).strip()
    messages.append(Message("user", first))
    for answer, question in zip(answers, users[1:], strict=True):
        messages += [Message("assistant", answer), Message("user", question)]
    return messages


def default_system_prompt(runtime: ModelRuntime) -> str | None:
    """The model's configured system prompt, else Meta's for Llama-2 chat models (as hosted), else none."""
    configured = runtime.config.defaults.system_prompt
    if configured is not None:
        return configured
    return LLAMA2_DEFAULT_SYSTEM_PROMPT if runtime.config.template == "llama-2" else None


def _chat_ids(runtime: ModelRuntime, messages: Sequence[Message]) -> list[int]:
    if any(m.role == "system" for m in messages):
        return runtime.chat_prompt_ids(messages)
    # No system prompt wanted: the model's configured default must not be added either.
    if runtime.config.template == "llama-2":
        return build_llama2_prompt(messages, runtime.tokenizer)
    if runtime.chat_template is None:
        raise ConfigError(f"model {runtime.name!r} has no chat template; use template: llama-2")
    return build_jinja_prompt(runtime.chat_template, messages, runtime.tokenizer)


def render_template(template: str, prompt: str, system_prompt: str) -> str:
    """One pass over the template, so braces inside the values are never substituted again."""
    values = {"prompt": prompt, "system_prompt": system_prompt}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def prompt_ids(inputs: PredictionInput, runtime: ModelRuntime) -> list[int]:
    """The prompt token ids for these inputs on this model; raises ``InvalidInput`` if none can be built."""
    system = inputs.system_prompt if inputs.system_prompt is not None else default_system_prompt(runtime)
    if inputs.prompt_template is not None:
        return runtime.text_prompt_ids(render_template(inputs.prompt_template, inputs.prompt, system or ""))
    dialogue = parse_dialogue(inputs.prompt)
    if dialogue is None and writes_format(inputs.prompt):
        return runtime.text_prompt_ids(inputs.prompt)
    messages = dialogue or [Message("user", inputs.prompt)]
    if system and messages[0].role != "system":
        messages = [Message("system", system), *messages]
    try:
        return _chat_ids(runtime, messages)
    except PromptError as exc:
        raise invalid("input.prompt", "value", str(exc)) from exc
