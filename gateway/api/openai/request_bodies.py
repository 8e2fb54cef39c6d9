"""OpenAI request bodies, decoded and validated by msgspec.

Unknown fields are ignored, as OpenAI-compatible servers do; a wrong type or an out-of-range
value is a 400 whose ``param`` names the field. ``null`` is the same as leaving a field out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from backends.base import MAX_TOP_LOGPROBS
from gateway.errors import ApiError, echo, invalid_request

MAX_CHOICES = 16
MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 2048
"""OpenAI's own limit on ``messages``; also what keeps prompt building's cost bounded."""
MAX_NAME_CHARS = 256
"""Model names, message names and ``user`` (the usage column holds 256 characters)."""
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 1024
MAX_INT32 = 2**31 - 1
MAX_TOOLS = 128
"""OpenAI's own limit on ``tools``."""

Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
Name = Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
StopText = Annotated[str, Meta(max_length=MAX_STOP_CHARS)]
LogitBias = Annotated[dict[str, Annotated[float, Meta(ge=-100, le=100)]], Meta(max_length=MAX_LOGIT_BIAS)]
Choices = Annotated[int, Meta(ge=1, le=MAX_CHOICES)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class ContentPart(msgspec.Struct):
    type: Name
    text: str | None = None


class FunctionCallIn(msgspec.Struct):
    name: Name
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct):
    """A call in an assistant message of the history."""

    function: FunctionCallIn
    id: Name = ""
    type: Name = "function"


class ChatMessageIn(msgspec.Struct):
    role: Name
    content: str | list[ContentPart] | None = None
    name: Name | None = None
    tool_calls: Annotated[list[ToolCallIn], Meta(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Name | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct):
    name: Name = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Name
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(msgspec.Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(msgspec.Struct):
    function: FunctionDefinition
    type: Name = "function"


class NamedFunction(msgspec.Struct):
    name: Name


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: Name = "function"


class SamplingFields(msgspec.Struct):
    """Fields shared by chat and legacy completions, including vLLM's extra sampling fields."""

    model: Annotated[str, Meta(max_length=MAX_NAME_CHARS)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Choices | None = None
    stop: StopText | list[StopText] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: Name | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    top_k: Annotated[int, Meta(ge=-1, le=MAX_INT32)] | None = None
    min_p: Probability | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=5)] | None = None
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_INT32)] | None = None
    response_format: ResponseFormat | None = None
    # Extensions, named as vLLM names them: a grammar for the reply.
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessageIn], Meta(max_length=MAX_MESSAGES)] = msgspec.field(default_factory=list)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[ToolDefinition], Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None


class CompletionRequest(SamplingFields):
    # msgspec takes one array type per union: the list's shape is checked after decoding.
    prompt: str | list[str | int | list[int]] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: TopLogprobs | None = None


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise invalid_request(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", param="stop")
    return tuple(s for s in sequences if s)


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float]:
    if not bias:
        return {}
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid_request(
                f"logit_bias keys must be token ids; got {echo(key)!r}.", param="logit_bias"
            ) from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise invalid_request(f"logit_bias token id {token} is out of range.", param="logit_bias")
        parsed[token] = value
    return parsed


def unsupported(param: str, what: str) -> ApiError:
    return invalid_request(f"{what} is not supported by this server.", param=param, code="unsupported_parameter")
