"""The hosted Llama-2-chat model's inputs: names, defaults and ranges, validated as Replicate does.

One table (``INPUT_FIELDS``) drives both validation and the version's OpenAPI input schema. Every
rejected field is reported at once (422 with ``invalid_fields``). ``null`` is the same as leaving a
field out; fields the model does not know are ignored, as they are on Replicate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from backends.base import SamplingParams
from gateway.api.replicate.problems import InvalidField, InvalidInput

FieldType = Literal["string", "integer", "number"]

# Meta's default system prompt for Llama-2-chat, which the hosted model uses when ``system_prompt`` is
# left out. Copied verbatim from ../shared/reference/llama2-default-system-prompt.txt (the
# ``DEFAULT_SYSTEM_PROMPT`` of Meta's original llama repository), no trailing newline.
LLAMA2_DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

# The hosted model's default template. Given verbatim it means the default: the prompt is then built as
# token ids like a chat request, not rendered and re-tokenized.
LLAMA2_PROMPT_TEMPLATE = "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{prompt} [/INST]"

MAX_STOP_SEQUENCES = 16
SEED_SPACE = 2**64


@dataclass(frozen=True, slots=True)
class InputField:
    name: str
    type: FieldType
    description: str
    default: str | float | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False


INPUT_FIELDS: tuple[InputField, ...] = (
    InputField("prompt", "string", "The user's message, or a whole [INST] ... [/INST] dialogue.", required=True),
    InputField(
        "system_prompt",
        "string",
        "Instructions placed before the first user message. Left out, the model's default applies;"
        " an empty string means no system prompt.",
        default=LLAMA2_DEFAULT_SYSTEM_PROMPT,
    ),
    InputField("max_new_tokens", "integer", "Most tokens to generate.", default=500, minimum=1),
    InputField(
        "min_new_tokens",
        "integer",
        "Fewest tokens to generate before the model may stop; -1 for no minimum.",
        default=-1,
        minimum=-1,
    ),
    InputField(
        "temperature",
        "number",
        "Sampling temperature: lower is more predictable, higher more varied.",
        default=0.5,
        minimum=0.01,
        maximum=5,
    ),
    InputField(
        "top_p",
        "number",
        "Sample only from the most likely tokens whose probabilities add up to top_p.",
        default=1.0,
        minimum=0.01,
        maximum=1,
    ),
    InputField(
        "top_k",
        "integer",
        "Sample only from the k most likely tokens; 0 or -1 for no limit.",
        default=50,
        minimum=-1,
    ),
    InputField(
        "repetition_penalty",
        "number",
        "Penalty for repeating tokens already present; 1 for none.",
        default=1.15,
        minimum=0.01,
        maximum=5,
    ),
    InputField(
        "stop_sequences",
        "string",
        "Comma-separated texts that end the generation; the matched text is not returned.",
    ),
    InputField("seed", "integer", "Seed for sampling; random when left out."),
    InputField(
        "prompt_template",
        "string",
        "A custom prompt format containing {prompt} and optionally {system_prompt}; left out, the"
        " Llama-2 chat format is used.",
        default=LLAMA2_PROMPT_TEMPLATE,
    ),
    InputField("max_tokens", "integer", "Another name for max_new_tokens.", minimum=1),
)
_FIELDS = {f.name: f for f in INPUT_FIELDS}


@dataclass(frozen=True, slots=True)
class PredictionInput:
    prompt: str
    system_prompt: str | None
    """None when left out (the model's default applies); "" for none at all."""
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop_sequences: tuple[str, ...]
    seed: int | None
    prompt_template: str | None
    """A custom template; None for the Llama-2 chat format (also when the default is sent verbatim)."""

    def sampling(self, room: int) -> SamplingParams:
        """Sampler settings, with the token budget capped at ``room`` (what the context has left)."""
        max_tokens = min(self.max_new_tokens, room)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k),
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else self.seed % SEED_SPACE,
            min_tokens=min(max(0, self.min_new_tokens), max_tokens),
        )


class _Reader:
    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._raw = raw
        self.problems: list[InvalidField] = []

    def _fail(self, name: str, type: str, description: str) -> None:
        self.problems.append(InvalidField(f"input.{name}", type, description))

    def value(self, name: str) -> str | int | float | None:
        spec = _FIELDS[name]
        value = self._raw.get(name)
        if value is None:
            if spec.required:
                self._fail(name, "required", f"{name} is required")
            return None
        if spec.type == "string":
            if not isinstance(value, str):
                self._fail(name, "type", "Invalid type. Expected: string")
                return None
            return value
        number = _number(value, integer=spec.type == "integer")
        if number is None:
            self._fail(name, "type", f"Invalid type. Expected: {spec.type}")
            return None
        if spec.minimum is not None and number < spec.minimum:
            self._fail(name, "minimum", f"Must be greater than or equal to {_show(spec.minimum)}")
            return None
        if spec.maximum is not None and number > spec.maximum:
            self._fail(name, "maximum", f"Must be less than or equal to {_show(spec.maximum)}")
            return None
        return number

    def string(self, name: str) -> str | None:
        value = self.value(name)
        return value if isinstance(value, str) else None

    def integer(self, name: str) -> int | None:
        value = self.value(name)
        return value if isinstance(value, int) else None

    def number(self, name: str) -> float | None:
        value = self.value(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def default(self, name: str) -> Any:
        return _FIELDS[name].default


def _number(value: object, *, integer: bool) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if integer:
        # JSON Schema counts 500.0 as an integer, as Replicate's validation does.
        if isinstance(value, float):
            return int(value) if value.is_integer() else None
        return value
    return value


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def parse_input(raw: object) -> PredictionInput:
    """Validate a prediction's ``input`` object; raises :class:`InvalidInput` naming every bad field."""
    if not isinstance(raw, Mapping):
        raise InvalidInput([InvalidField("input", "type", "Invalid type. Expected: object")])
    read = _Reader(raw)
    prompt = read.string("prompt")
    system_prompt = read.string("system_prompt")
    max_new = read.integer("max_new_tokens")
    max_alias = read.integer("max_tokens")
    min_new = read.integer("min_new_tokens")
    temperature = read.number("temperature")
    top_p = read.number("top_p")
    top_k = read.integer("top_k")
    penalty = read.number("repetition_penalty")
    stops_text = read.string("stop_sequences")
    seed = read.integer("seed")
    template = read.string("prompt_template")
    problems = read.problems
    if max_new is not None and max_alias is not None and max_new != max_alias:
        problems.append(
            InvalidField("input.max_tokens", "value", "max_tokens and max_new_tokens differ; send one of them")
        )
    max_tokens: int = max_new if max_new is not None else max_alias if max_alias is not None else 500
    min_tokens: int = min_new if min_new is not None else -1
    if min_tokens > max_tokens:
        problems.append(InvalidField("input.min_new_tokens", "value", "Must not be greater than max_new_tokens"))
    stops = tuple(s for s in (stops_text or "").split(",") if s)
    if len(stops) > MAX_STOP_SEQUENCES:
        problems.append(InvalidField("input.stop_sequences", "value", f"At most {MAX_STOP_SEQUENCES} stop sequences"))
    if template is not None and "{prompt}" not in template:
        problems.append(InvalidField("input.prompt_template", "value", "Must contain {prompt}"))
    if problems:
        raise InvalidInput(problems)
    assert prompt is not None  # a missing prompt is a problem above
    return PredictionInput(
        prompt=prompt,
        system_prompt=system_prompt,
        max_new_tokens=max_tokens,
        min_new_tokens=min_tokens,
        temperature=temperature if temperature is not None else read.default("temperature"),
        top_p=top_p if top_p is not None else read.default("top_p"),
        top_k=top_k if top_k is not None else read.default("top_k"),
        repetition_penalty=penalty if penalty is not None else read.default("repetition_penalty"),
        stop_sequences=stops,
        seed=seed,
        prompt_template=None if template == LLAMA2_PROMPT_TEMPLATE else template,
    )
