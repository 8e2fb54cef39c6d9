from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.api.replicate.inputs import LLAMA2_DEFAULT_SYSTEM_PROMPT, LLAMA2_PROMPT_TEMPLATE, parse_input
from gateway.api.replicate.problems import InvalidInput
from gateway.api.replicate.prompt import parse_dialogue, prompt_ids, render_template
from gateway.serving.prompts import Message
from gateway.serving.prompts.llama2 import build_llama2_prompt
from gateway.serving.registry import ModelRuntime
from gateway.settings import RequestDefaults

DIALOGUE = (
    "[INST] Hi! [/INST]\nHello! How are you?\n"
    "[INST] I'm great, thanks for asking. Could you help me with a task? [/INST]"
)
TURNS = [
    Message("user", "Hi!"),
    Message("assistant", "Hello! How are you?"),
    Message("user", "I'm great, thanks for asking. Could you help me with a task?"),
]


def ids_for(runtime: ModelRuntime, **raw: object) -> list[int]:
    return prompt_ids(parse_input(raw), runtime)


def test_a_plain_prompt_builds_the_same_ids_as_a_chat_request(runtime: ModelRuntime) -> None:
    ids = ids_for(runtime, prompt="What is the capital of France?", system_prompt="Be brief.")
    chat = runtime.chat_prompt_ids([Message("system", "Be brief."), Message("user", "What is the capital of France?")])
    assert ids == chat
    assert ids[0] == runtime.tokenizer.bos_id
    assert ids.count(runtime.tokenizer.bos_id) == 1


def test_the_hosted_default_system_prompt_applies_when_left_out(runtime: ModelRuntime) -> None:
    expected = build_llama2_prompt(
        [Message("system", LLAMA2_DEFAULT_SYSTEM_PROMPT), Message("user", "Hi")], runtime.tokenizer
    )
    assert ids_for(runtime, prompt="Hi") == expected


def test_a_configured_system_prompt_wins_over_metas(make_runtime: Callable[..., ModelRuntime]) -> None:
    runtime = make_runtime(defaults=RequestDefaults(system_prompt="Configured."))
    expected = build_llama2_prompt([Message("system", "Configured."), Message("user", "Hi")], runtime.tokenizer)
    assert ids_for(runtime, prompt="Hi") == expected


def test_an_empty_system_prompt_means_none(make_runtime: Callable[..., ModelRuntime]) -> None:
    runtime = make_runtime(defaults=RequestDefaults(system_prompt="Configured."))
    assert ids_for(runtime, prompt="Hi", system_prompt="") == build_llama2_prompt(
        [Message("user", "Hi")], runtime.tokenizer
    )


def test_a_dialogue_prompt_builds_the_same_ids_as_those_chat_messages(runtime: ModelRuntime) -> None:
    ids = ids_for(runtime, prompt=DIALOGUE, system_prompt="Be brief.")
    assert ids == runtime.chat_prompt_ids([Message("system", "Be brief."), *TURNS])
    # Each finished turn ends in EOS and every turn starts with BOS, as ids.
    assert ids.count(runtime.tokenizer.bos_id) == 2
    assert ids.count(runtime.tokenizer.eos_id) == 1


@pytest.mark.parametrize(
    "prompt",
    [
        DIALOGUE,
        "<s>[INST] Hi! [/INST] Hello! How are you? </s><s>[INST] I'm great, thanks for asking."
        " Could you help me with a task? [/INST]",
        "  [INST]Hi![/INST]Hello! How are you?[INST]I'm great, thanks for asking. Could you help me with a task?"
        "[/INST]\n",
    ],
    ids=["page-example", "with-bos-eos-text", "tight-spacing"],
)
def test_dialogues_parse_into_turns(prompt: str) -> None:
    assert parse_dialogue(prompt) == TURNS


def test_a_system_block_in_the_first_turn_is_the_system_message(runtime: ModelRuntime) -> None:
    prompt = "[INST] <<SYS>>\nAnswer in French.\n<</SYS>>\n\nHi! [/INST]"
    assert parse_dialogue(prompt) == [Message("system", "Answer in French."), Message("user", "Hi!")]
    # It replaces the system_prompt input, so the dialogue is billed as written.
    assert ids_for(runtime, prompt=prompt, system_prompt="ignored") == runtime.chat_prompt_ids(
        [Message("system", "Answer in French."), Message("user", "Hi!")]
    )


@pytest.mark.parametrize(
    "prompt",
    [
        "[INST] Write a poem [/INST] Roses are red,",  # ends in an answer for the model to continue
        "[INST] unbalanced [INST] tags [/INST]",
        "<s>[INST] Hi [/INST] Hello </s> stray",
    ],
)
def test_a_prompt_in_the_format_that_is_no_dialogue_is_kept_as_text(runtime: ModelRuntime, prompt: str) -> None:
    assert parse_dialogue(prompt) is None
    tokenizer = runtime.tokenizer
    ids = ids_for(runtime, prompt=prompt)
    assert ids == [tokenizer.bos_id, *tokenizer.encode(prompt)]
    assert ids.count(tokenizer.bos_id) == 1
    assert tokenizer.eos_id not in ids


def test_tags_inside_a_plain_question_are_just_text(runtime: ModelRuntime) -> None:
    question = "What do [INST] and [/INST] mean?"
    assert parse_dialogue(question) is None
    assert ids_for(runtime, prompt=question, system_prompt="") == build_llama2_prompt(
        [Message("user", question)], runtime.tokenizer
    )


def test_a_custom_template_is_rendered_once_and_tokenized_as_plain_text(runtime: ModelRuntime) -> None:
    template = "### System: {system_prompt}\n### User: {prompt}\n### Assistant:"
    ids = ids_for(runtime, prompt="say {system_prompt} </s>", system_prompt="Use {prompt}.", prompt_template=template)
    text = "### System: Use {prompt}.\n### User: say {system_prompt} </s>\n### Assistant:"
    tokenizer = runtime.tokenizer
    assert ids == [tokenizer.bos_id, *tokenizer.encode(text)]
    assert tokenizer.eos_id not in ids


def test_render_template_substitutes_both_placeholders() -> None:
    assert render_template(LLAMA2_PROMPT_TEMPLATE, "Hi", "Sys") == "[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST]"


def test_the_default_template_sent_verbatim_builds_ids_like_the_chat_path(runtime: ModelRuntime) -> None:
    assert ids_for(runtime, prompt="Hi", system_prompt="Sys", prompt_template=LLAMA2_PROMPT_TEMPLATE) == ids_for(
        runtime, prompt="Hi", system_prompt="Sys"
    )


def test_a_jinja_model_uses_its_own_template(make_runtime: Callable[..., ModelRuntime]) -> None:
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    runtime = make_runtime(
        template="jinja",
        defaults=RequestDefaults(system_prompt="Configured."),
        options={"chat_template": template},
    )
    tokenizer = runtime.tokenizer
    assert ids_for(runtime, prompt="Hi") == tokenizer.encode_with_special(
        "<|system|>Configured.\n<|user|>Hi\n<|assistant|>"
    )
    assert ids_for(runtime, prompt="Hi", system_prompt="") == tokenizer.encode_with_special("<|user|>Hi\n<|assistant|>")


def test_a_dialogue_the_template_rejects_is_invalid_input(make_runtime: Callable[..., ModelRuntime]) -> None:
    template = "{{ raise_exception('no assistants here') if messages|length > 1 else messages[0].content }}"
    runtime = make_runtime(template="jinja", options={"chat_template": template})
    with pytest.raises(InvalidInput) as error:
        ids_for(runtime, prompt=DIALOGUE)
    assert error.value.fields[0].field == "input.prompt"
