from __future__ import annotations

from typing import Any

import pytest

from gateway.api.replicate.inputs import (
    LLAMA2_DEFAULT_SYSTEM_PROMPT,
    LLAMA2_PROMPT_TEMPLATE,
    PredictionInput,
    parse_input,
)
from gateway.api.replicate.problems import InvalidInput
from tests.support.paths import FIXTURES

FIXTURE = FIXTURES / "replicate" / "llama2-default-system-prompt.txt"


def rejected(raw: Any) -> dict[str, str]:
    """The rejected fields of an input, by field, with their error type."""
    with pytest.raises(InvalidInput) as error:
        parse_input(raw)
    assert error.value.status == 422
    return {f.field: f.type for f in error.value.fields}


def test_the_default_system_prompt_is_metas_text_exactly() -> None:
    assert FIXTURE.read_bytes().decode("utf-8") == LLAMA2_DEFAULT_SYSTEM_PROMPT


def test_defaults_are_the_hosted_models() -> None:
    parsed = parse_input({"prompt": "Hi"})
    assert parsed == PredictionInput(
        prompt="Hi",
        system_prompt=None,
        max_new_tokens=500,
        min_new_tokens=-1,
        temperature=0.5,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.15,
        stop_sequences=(),
        seed=None,
        prompt_template=None,
    )
    sampling = parsed.sampling(room=4000)
    assert (sampling.max_tokens, sampling.min_tokens, sampling.top_k, sampling.seed) == (500, 0, 50, None)
    assert (sampling.temperature, sampling.top_p, sampling.repetition_penalty) == (0.5, 1.0, 1.15)
    assert (sampling.min_p, sampling.presence_penalty, sampling.frequency_penalty) == (0.0, 0.0, 0.0)


def test_null_is_the_same_as_leaving_a_field_out() -> None:
    assert parse_input({"prompt": "Hi", "temperature": None, "seed": None}) == parse_input({"prompt": "Hi"})


def test_unknown_fields_are_ignored() -> None:
    assert parse_input({"prompt": "Hi", "debug": True}) == parse_input({"prompt": "Hi"})


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("max_new_tokens", 0, "minimum"),
        ("max_tokens", 0, "minimum"),
        ("min_new_tokens", -2, "minimum"),
        ("temperature", 0.0, "minimum"),
        ("temperature", 5.01, "maximum"),
        ("top_p", 0.0, "minimum"),
        ("top_p", 1.5, "maximum"),
        ("top_k", -2, "minimum"),
        ("repetition_penalty", 0.0, "minimum"),
        ("repetition_penalty", 5.5, "maximum"),
        ("max_new_tokens", 1.5, "type"),
        ("max_new_tokens", True, "type"),
        ("temperature", "0.5", "type"),
        ("seed", "42", "type"),
        ("prompt", 42, "type"),
        ("stop_sequences", ["a", "b"], "type"),
    ],
)
def test_out_of_range_and_wrongly_typed_values_are_rejected(field: str, value: Any, error: str) -> None:
    assert rejected({"prompt": "Hi", field: value}) == {f"input.{field}": error}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0.01),
        ("temperature", 5),
        ("top_p", 0.01),
        ("top_p", 1),
        ("max_new_tokens", 1),
        ("min_new_tokens", -1),
        ("repetition_penalty", 0.01),
        ("repetition_penalty", 5),
        ("top_k", -1),
    ],
)
def test_range_bounds_are_inclusive(field: str, value: float) -> None:
    parse_input({"prompt": "Hi", field: value})


def test_an_integral_float_counts_as_an_integer() -> None:
    assert parse_input({"prompt": "Hi", "max_new_tokens": 64.0}).max_new_tokens == 64


def test_every_bad_field_is_reported_at_once() -> None:
    assert rejected({"temperature": 9, "top_k": "x"}) == {
        "input.prompt": "required",
        "input.temperature": "maximum",
        "input.top_k": "type",
    }
    assert rejected(["not", "an", "object"]) == {"input": "type"}


def test_max_tokens_is_another_name_for_max_new_tokens() -> None:
    assert parse_input({"prompt": "Hi", "max_tokens": 32}).max_new_tokens == 32
    assert parse_input({"prompt": "Hi", "max_tokens": 32, "max_new_tokens": 32}).max_new_tokens == 32
    assert rejected({"prompt": "Hi", "max_tokens": 32, "max_new_tokens": 64}) == {"input.max_tokens": "value"}


def test_min_new_tokens_may_not_exceed_max_new_tokens() -> None:
    assert rejected({"prompt": "Hi", "max_new_tokens": 4, "min_new_tokens": 5}) == {"input.min_new_tokens": "value"}
    sampling = parse_input({"prompt": "Hi", "max_new_tokens": 8, "min_new_tokens": 8}).sampling(room=4000)
    assert (sampling.max_tokens, sampling.min_tokens) == (8, 8)


def test_the_token_budget_is_capped_by_the_room_left_in_the_context() -> None:
    sampling = parse_input({"prompt": "Hi", "min_new_tokens": 300}).sampling(room=100)
    assert (sampling.max_tokens, sampling.min_tokens) == (100, 100)


def test_stop_sequences_are_comma_separated_and_kept_exactly() -> None:
    assert parse_input({"prompt": "Hi", "stop_sequences": "<end>,,\nUser:, ###"}).stop_sequences == (
        "<end>",
        "\nUser:",
        " ###",
    )
    assert rejected({"prompt": "Hi", "stop_sequences": ",".join("abcdefghijklmnopq")}) == {
        "input.stop_sequences": "value"
    }


def test_seeds_of_any_sign_map_into_the_samplers_range() -> None:
    assert parse_input({"prompt": "Hi", "seed": 42}).sampling(room=10).seed == 42
    assert parse_input({"prompt": "Hi", "seed": -1}).sampling(room=10).seed == 2**64 - 1


def test_top_k_off_is_zero_for_the_backend() -> None:
    assert parse_input({"prompt": "Hi", "top_k": -1}).sampling(room=10).top_k == 0


def test_the_default_template_sent_verbatim_means_the_default() -> None:
    assert parse_input({"prompt": "Hi", "prompt_template": LLAMA2_PROMPT_TEMPLATE}).prompt_template is None
    assert parse_input({"prompt": "Hi", "prompt_template": "Q: {prompt}\nA:"}).prompt_template == "Q: {prompt}\nA:"
    assert rejected({"prompt": "Hi", "prompt_template": "no placeholder"}) == {"input.prompt_template": "value"}


def test_the_problem_body_lists_each_field() -> None:
    with pytest.raises(InvalidInput) as error:
        parse_input({"prompt": "Hi", "temperature": 9})
    assert error.value.body() == {
        "title": "Input validation failed",
        "detail": "- input.temperature: Must be less than or equal to 5\n",
        "status": 422,
        "invalid_fields": [
            {"type": "maximum", "field": "input.temperature", "description": "Must be less than or equal to 5"}
        ],
    }
