"""From OpenAI request bodies to what a generation needs: prompt ids and sampling settings."""

from __future__ import annotations

from backends.base import SamplingParams
from gateway.api.openai.request_bodies import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    SamplingFields,
    logit_bias_ids,
    unsupported,
)
from gateway.errors import ApiError, echo, invalid_request
from gateway.serving.prompts import Message, PromptError, Role
from gateway.serving.registry import ModelRuntime, ToolPlan
from gateway.serving.tools import ToolCall

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _flatten(message: ChatMessageIn, index: int) -> str:
    param = f"messages.[{index}].content"
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""  # a turn of only tool calls, or an empty reply
        raise invalid_request(f"Message {index} ({message.role}) has no content.", param=param)
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise invalid_request(
                f"Content parts of type {part.type!r} are not supported; only text parts are.", param=param
            )
        texts.append(part.text)
    return "".join(texts)


def chat_messages(request: ChatCompletionRequest) -> list[Message]:
    if not request.messages:
        raise invalid_request("'messages' must be a non-empty array.", param="messages")
    messages = []
    for index, message in enumerate(request.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise invalid_request(
                f"Invalid role {message.role!r} in message {index}: supported roles are "
                "system, developer, user, assistant and tool.",
                param=f"messages.[{index}].role",
            )
        messages.append(_message(role, message, index))
    _check_tool_results(messages)
    return messages


def _check_tool_results(messages: list[Message]) -> None:
    """Every ``tool`` message answers a call of the assistant message just before it, as OpenAI requires."""
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        if message.role != "tool":
            open_calls = {call.id for call in message.tool_calls}
            continue
        if message.tool_call_id not in open_calls:
            raise invalid_request(
                f"Message {index} (tool) must answer a tool call of the assistant message before it; "
                f"no such call has id {echo(message.tool_call_id or '')!r}.",
                param=f"messages.[{index}].tool_call_id",
            )


def _message(role: Role, message: ChatMessageIn, index: int) -> Message:
    if role == "tool":
        if not message.tool_call_id:
            raise invalid_request(
                f"Message {index} (tool) needs the tool_call_id it answers.", param=f"messages.[{index}].tool_call_id"
            )
        return Message("tool", _flatten(message, index), tool_call_id=message.tool_call_id, name=message.name)
    if message.tool_calls and role != "assistant":
        raise invalid_request(
            f"Only assistant messages carry tool_calls; message {index} is {message.role!r}.",
            param=f"messages.[{index}].tool_calls",
        )
    calls = tuple(
        ToolCall(call.id or f"call_{index}_{position}", call.function.name, call.function.arguments)
        for position, call in enumerate(message.tool_calls or ())
    )
    return Message(role, _flatten(message, index), tool_calls=calls, name=message.name)


def reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options may only be set when stream is true.", param="stream_options")


def reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.suffix:
        raise unsupported("suffix", "suffix")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise unsupported("best_of", "best_of other than n")
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options may only be set when stream is true.", param="stream_options")


def completion_prompt_ids(request: CompletionRequest, runtime: ModelRuntime) -> list[int]:
    prompt = request.prompt
    if prompt is None:
        raise invalid_request("Missing required parameter: 'prompt'.", param="prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        if not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
            raise invalid_request(
                "prompt must be a string, a list of strings, a list of token ids or a list of such lists.",
                param="prompt",
            )
        if len(prompt) != 1:
            raise unsupported("prompt", "More than one prompt per request")
        prompt = prompt[0]  # type: ignore[assignment]  # one string or one id list
    if isinstance(prompt, str):
        return runtime.text_prompt_ids(prompt)
    ids = [t for t in prompt if isinstance(t, int)]
    if len(ids) != len(prompt) or not ids:
        raise invalid_request("The prompt must be non-empty text or a list of token ids.", param="prompt")
    vocab = runtime.tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise invalid_request(f"Prompt token ids must lie in [0, {vocab}).", param="prompt")
    return ids


def chat_prompt_ids(request: ChatCompletionRequest, runtime: ModelRuntime, tools: ToolPlan | None) -> list[int]:
    messages = chat_messages(request)
    try:
        return runtime.chat_prompt_ids(messages, tools)
    except PromptError as exc:
        raise invalid_request(str(exc), param=exc.param) from exc


def _context_error(runtime: ModelRuntime, prompt: int, completion: int | None) -> ApiError:
    limit = runtime.usable_context_length
    if completion is None:
        detail = f"your messages resulted in {prompt} tokens"
    else:
        detail = (
            f"you requested {prompt + completion} tokens ({prompt} in the messages, {completion} in the completion)"
        )
    return invalid_request(
        f"This model's maximum context length is {limit} tokens. However, {detail}. "
        "Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def sampling_params(
    fields: SamplingFields, runtime: ModelRuntime, prompt_tokens: int, max_tokens: int | None
) -> SamplingParams:
    """Request values, else the model's configured defaults, else OpenAI's defaults."""
    room = runtime.usable_context_length - prompt_tokens
    if room <= 0:
        raise _context_error(runtime, prompt_tokens, None)
    defaults = runtime.config.defaults
    if max_tokens is not None:
        if max_tokens > room:
            raise _context_error(runtime, prompt_tokens, max_tokens)
    else:
        max_tokens = min(defaults.max_tokens or room, room)
    min_tokens = fields.min_tokens or 0
    if min_tokens > max_tokens:
        raise invalid_request("min_tokens must not exceed max_tokens.", param="min_tokens")
    caps = runtime.backend.capabilities
    bias = logit_bias_ids(fields.logit_bias, runtime.tokenizer.vocab_size)
    if bias and not caps.supports_logit_bias:
        raise unsupported("logit_bias", "logit_bias on this model")
    top_k = fields.top_k if fields.top_k is not None else defaults.top_k
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_pick(fields.temperature, defaults.temperature, 1.0),
        top_p=_pick(fields.top_p, defaults.top_p, 1.0),
        top_k=max(0, top_k or 0),  # vLLM spells "off" as -1, we as 0
        min_p=fields.min_p or 0.0,
        repetition_penalty=_pick(fields.repetition_penalty, defaults.repetition_penalty, 1.0),
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        seed=None if fields.seed is None else fields.seed % 2**64,
        min_tokens=min_tokens,
        logit_bias=bias,
    )


def _pick(value: float | None, default: float | None, fallback: float) -> float:
    if value is not None:
        return value
    return default if default is not None else fallback
