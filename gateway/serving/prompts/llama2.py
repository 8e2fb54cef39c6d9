"""Llama-2 chat prompts, built as token ids exactly as Meta's reference ``chat_completion`` does."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.serving.prompts import Message, PromptError
from gateway.serving.tokenizers import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _dialog(messages: Sequence[Message]) -> list[Message]:
    if not messages:
        raise PromptError("messages must contain at least one user message")
    dialog = list(messages)
    if dialog[0].role == "system":
        if len(dialog) < 2:
            raise PromptError("a system message must be followed by a user message")
        merged = B_SYS + dialog[0].content + E_SYS + dialog[1].content
        dialog = [Message(role=dialog[1].role, content=merged), *dialog[2:]]
    for index, message in enumerate(dialog):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise PromptError(
                "the llama-2 template needs an optional first system message, then user and assistant"
                f" messages alternating from user; got {message.role!r} where {expected!r} belongs"
            )
    if dialog[-1].role != "user":
        raise PromptError(f"the last message must be from the user, got {dialog[-1].role!r}")
    return dialog


def build_llama2_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The prompt ids of Meta's ``chat_completion`` for one dialog.

    An optional first system message is merged into the first user turn. Every finished
    (user, assistant) pair becomes ``<s>[INST] {user} [/INST] {assistant} </s>`` and the last user turn
    ``<s>[INST] {user} [/INST]``, with BOS and EOS as ids and each text ``.strip()``-ed whole.

    Meta's code answers a dialog containing ``[INST]``, ``[/INST]``, ``<<SYS>>`` or ``<</SYS>>`` with an
    error text instead of a completion. Here such tags, and ``<s>`` or ``</s>``, are tokenized as plain
    text like any other characters, so a dialog that quotes the format still gets an answer. They can
    imitate the format's text but never produce the BOS/EOS ids, which appear only where this function
    puts them.
    Raises :class:`PromptError` when the roles are not in the order above.
    """
    dialog = _dialog(messages)
    ids: list[int] = []
    for prompt, answer in zip(dialog[:-1:2], dialog[1::2], strict=True):
        text = f"{B_INST} {prompt.content.strip()} {E_INST} {answer.content.strip()} "
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    ids += [tokenizer.bos_id, *tokenizer.encode(f"{B_INST} {dialog[-1].content.strip()} {E_INST}")]
    return ids
