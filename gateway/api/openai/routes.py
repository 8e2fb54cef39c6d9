"""OpenAI-compatible routes: chat completions, legacy completions and models."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from litestar import Request, Response, get, post

from backends.base import BackendError, GrammarRejected, SamplingParams
from gateway.accounting.metering import Ticket, UsageStatus, usage_status
from gateway.api.admission import admit
from gateway.api.auth import current_key
from gateway.api.heavy_work import sized_work
from gateway.api.json_bodies import decode_body, json_bytes
from gateway.api.openai.choice_assembly import ChoiceAssembler, Content, Finished
from gateway.api.openai.output_controls import OutputControls, chat_output_controls, completion_output_controls
from gateway.api.openai.request_bodies import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    stop_sequences,
)
from gateway.api.openai.response_bodies import ChoiceReply, ChunkWriter, chat_body, sse, text_body
from gateway.api.openai.translation import (
    chat_prompt_ids,
    completion_prompt_ids,
    reject_unsupported_chat,
    reject_unsupported_completion,
    sampling_params,
)
from gateway.api.settled_stream import SettledStream
from gateway.errors import ApiError, model_not_found
from gateway.serving.fallbacks import FirstToStart
from gateway.serving.generation import Generation
from gateway.serving.queueing import Reservation
from gateway.serving.registry import ModelRuntime
from gateway.serving.tools.stream import ToolCallArguments, ToolCallStarted
from gateway.state import gateway_state, request_id

AnyRequest = Request[Any, Any, Any]
MODEL_CREATED = 1_690_000_000
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SERVED_MODEL_HEADER = "x-gateway-served-model"
"""On whole responses: the configured name of the model that served (a fallback, or the one asked for)."""
_logger = structlog.get_logger("gateway.api.openai")

DISCONNECT_WATCH_AFTER_S = 0.05
"""How long a non-streamed generation runs before its request starts watching for the client leaving."""

# Usage writes for streams cut off by the client outlive the cancelled request task.
_background: set[asyncio.Task[None]] = set()


def _in_background(work: Awaitable[None]) -> None:
    async def run() -> None:
        await work

    task = asyncio.create_task(run())
    _background.add(task)
    task.add_done_callback(_background.discard)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What a request becomes for one model: its prompt, and what its reply must be."""

    prompt_ids: list[int]
    controls: OutputControls
    echoed: str = ""


_Prepare = Callable[[ModelRuntime], Awaitable[_Prepared]]
"""Builds a request for a model: the requested one, or a fallback when its turn comes."""


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One model's generation of a request, with the assemblers of its choices."""

    generation: Generation
    assemblers: list[ChoiceAssembler]


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: AnyRequest) -> Response[Any]:
    raw = await json_bytes(request)
    body = decode_body(raw, ChatCompletionRequest)
    reject_unsupported_chat(body)

    async def prepare(runtime: ModelRuntime) -> _Prepared:
        controls = await sized_work(len(raw), chat_output_controls, body, runtime)
        prompt_ids = await sized_work(len(raw), chat_prompt_ids, body, runtime, controls.tools)
        return _Prepared(prompt_ids, controls)

    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _respond(request, body, "chat", prepare, max_tokens)


@post("/v1/completions", status_code=200)
async def completions(request: AnyRequest) -> Response[Any]:
    raw = await json_bytes(request)
    body = decode_body(raw, CompletionRequest)
    reject_unsupported_completion(body)

    async def prepare(runtime: ModelRuntime) -> _Prepared:
        controls = await sized_work(len(raw), completion_output_controls, body, runtime)
        prompt_ids = await sized_work(len(raw), completion_prompt_ids, body, runtime)
        echoed = _echoed_prompt(body, runtime, prompt_ids) if body.echo else ""
        return _Prepared(prompt_ids, controls, echoed)

    # The legacy endpoint's max_tokens defaults to 16, as OpenAI's does.
    return await _respond(request, body, "text", prepare, body.max_tokens or 16)


def _echoed_prompt(body: CompletionRequest, runtime: ModelRuntime, prompt_ids: list[int]) -> str:
    """The prompt as ``echo`` repeats it: the client's own text, or its token ids decoded."""
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    return runtime.tokenizer.decode(prompt_ids)


async def _respond(
    request: AnyRequest, body: SamplingFields, kind: str, prepare: _Prepare, max_tokens: int | None
) -> Response[Any]:
    state = gateway_state(request)
    runtime = state.models.get(body.model)
    prepared = await prepare(runtime)
    sampling = sampling_params(body, runtime, len(prepared.prompt_ids), max_tokens)
    reservation = runtime.queue.reserve(body.n or 1)
    key = current_key(request)
    fallbacks = [model for model in state.models.fallbacks_of(runtime) if key.allows_model(model.name)]
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    try:
        ticket = await admit(
            request,
            runtime,
            endpoint=endpoint,
            prompt_tokens=len(prepared.prompt_ids),
            max_new_tokens=sampling.max_tokens * (body.n or 1),
            user=body.user,
            fallbacks=fallbacks,
        )
    except BaseException:
        reservation.release()
        raise
    first = _attempt(request, body, kind, runtime, prepared, sampling, reservation)

    def later() -> AsyncGenerator[_Attempt]:
        return _fallback_attempts(request, body, kind, fallbacks, prepare, max_tokens)

    chain = FirstToStart(first, later if fallbacks else None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter("chat" if kind == "chat" else "text", body.model, include_usage)
        return SettledStream(
            # With fallbacks, the role chunks wait for the first event: every chunk names the
            # model that serves.
            _stream(chain, ticket, writer, roles_first=not fallbacks),
            # A client that leaves before the body starts never runs the stream's own clean-up.
            on_close=lambda: _abandon(chain, ticket),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **ticket.headers},
        )
    replies = await _collect(request, chain, ticket)
    build = chat_body if kind == "chat" else text_body
    served = chain.generation
    headers = {**ticket.headers, SERVED_MODEL_HEADER: served.runtime.name}
    return Response(build(served, _served_name(chain, body.model), replies), status_code=200, headers=headers)


def _attempt(
    request: AnyRequest,
    body: SamplingFields,
    kind: str,
    runtime: ModelRuntime,
    prepared: _Prepared,
    sampling: SamplingParams,
    reservation: Reservation,
) -> _Attempt:
    controls = prepared.controls
    generation = Generation(
        runtime,
        request_id(request),
        prepared.prompt_ids,
        sampling,
        stop_sequences(body.stop),
        body.n or 1,
        reservation=reservation,
        continuation=kind == "text",
        constraint=controls.constraint,
        logprobs=controls.logprobs,
        prompt_logprobs=controls.prompt_logprobs,
    )
    assemblers = [
        ChoiceAssembler(controls.tools, logprobs=controls.logprobs is not None, prefix=prepared.echoed)
        for _ in range(generation.n)
    ]
    return _Attempt(generation, assemblers)


async def _fallback_attempts(
    request: AnyRequest,
    body: SamplingFields,
    kind: str,
    fallbacks: list[ModelRuntime],
    prepare: _Prepare,
    max_tokens: int | None,
) -> AsyncGenerator[_Attempt]:
    """The request built for each fallback in turn; one that cannot take it (too long a prompt, a
    feature it lacks, a full queue) is passed over."""
    for runtime in fallbacks:
        try:
            prepared = await prepare(runtime)
            sampling = sampling_params(body, runtime, len(prepared.prompt_ids), max_tokens)
            reservation = runtime.queue.reserve(body.n or 1)
        except ApiError as exc:
            _logger.warning("fallback_passed_over", fallback=runtime.name, reason=exc.message)
            continue
        yield _attempt(request, body, kind, runtime, prepared, sampling, reservation)


def _served_name(chain: FirstToStart[_Attempt], requested: str) -> str:
    """The ``model`` a response names: as the client asked for it, or the fallback that served."""
    return chain.generation.runtime.name if chain.fell_back else requested


async def _collect(request: AnyRequest, chain: FirstToStart[_Attempt], ticket: Ticket) -> dict[int, ChoiceReply]:
    """Run a non-streamed generation in the request's own task; a watcher cancels it if the
    client disconnects meanwhile."""
    this = asyncio.current_task()
    if this is None:
        raise RuntimeError("_collect runs in a task")
    client_left = False
    watcher: asyncio.Task[None] | None = None

    def stop_generating(watched: asyncio.Task[None]) -> None:
        nonlocal client_left
        if collecting and not watched.cancelled():
            client_left = True
            this.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.create_task(_wait_for_disconnect(request))
        watcher.add_done_callback(stop_generating)

    collecting = True
    # Most generations end before a client could notice and leave: the watcher, a task of its
    # own, starts only for one still running after a moment (a disconnect before then is seen
    # as soon as it starts).
    start_watching = asyncio.get_running_loop().call_later(DISCONNECT_WATCH_AFTER_S, watch)
    status: UsageStatus = "cancelled"
    try:
        async with contextlib.aclosing(chain.events()) as events:
            async for event in events:
                chain.current.assemblers[event.index].feed(event)
        status = usage_status(chain.generation)
    except asyncio.CancelledError:
        if not client_left:
            raise
        this.uncancel()  # the generation stopped because its client left; the request ends here
    except BackendError as exc:
        status = "failed"
        raise _generation_error(exc, chain.generation) from None
    finally:
        collecting = False
        start_watching.cancel()
        if watcher is not None:
            watcher.cancel()
        await ticket.finish(chain.generation, status)
    return {index: assembler.reply for index, assembler in enumerate(chain.current.assemblers)}


def _generation_error(exc: BackendError, generation: Generation) -> ApiError:
    """What a client is told of a generation that failed: a grammar no reply can follow is its
    request's fault (400, not retried by SDKs); anything else is the server's (503, retry)."""
    # llguidance appends its parser state and the whole grammar to the first line.
    reason = str(exc).partition("\n")[0]
    _logger.warning("generation_failed", error=reason, grammar=isinstance(exc, GrammarRejected))
    if isinstance(exc, GrammarRejected):
        constraint = generation.constraint
        return ApiError(
            400,
            f"The model cannot produce a reply that follows the requested format: {reason}",
            param=constraint.param if constraint is not None else None,
            code="invalid_schema",
        )
    return ApiError(503, "The model failed while generating; please retry.", type="server_error")


async def _wait_for_disconnect(request: AnyRequest) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(
    chain: FirstToStart[_Attempt], ticket: Ticket, writer: ChunkWriter, *, roles_first: bool
) -> AsyncIterator[bytes]:
    status: UsageStatus | None = None
    n = chain.generation.n
    try:
        roles_pending = writer.kind == "chat"
        if roles_first and roles_pending:
            roles_pending = False
            for index in range(n):
                yield writer.role(index)
        held_finish: bytes | None = None
        first = True
        async for event in chain.events():
            if first:
                first = False
                writer.model = _served_name(chain, writer.model)
                if roles_pending:
                    for index in range(n):
                        yield writer.role(index)
            generation = chain.generation
            index = event.index
            for piece in chain.current.assemblers[index].feed(event):
                if isinstance(piece, Content):
                    yield writer.content(index, piece.text, piece.logprobs)
                elif isinstance(piece, ToolCallStarted):
                    yield writer.tool_call_started(index, piece.index, piece.id, piece.name)
                elif isinstance(piece, ToolCallArguments):
                    yield writer.tool_call_arguments(index, piece.index, piece.fragment)
                elif isinstance(piece, Finished):
                    finish = writer.finish(index, piece.reason, piece.logprobs)
                    if generation.finished:
                        held_finish = finish  # the last bytes wait for the usage row
                    else:
                        yield finish
        status = usage_status(chain.generation)
        await ticket.finish(chain.generation, status)
        # The stream's last events leave together: one write to the client instead of three.
        tail = held_finish or b""
        if writer.include_usage:
            tail += writer.usage(chain.generation)
        yield tail + b"data: [DONE]\n\n"
    except BackendError as exc:
        status = "failed"
        await ticket.finish(chain.generation, status)
        yield sse(_generation_error(exc, chain.generation).body())
    finally:
        if status is None:
            _in_background(ticket.finish(chain.generation, "cancelled"))


def _abandon(chain: FirstToStart[_Attempt], ticket: Ticket) -> None:
    """Settle a stream whose body never ran; a no-op when it ran (its ticket is finished)."""
    chain.generation.release_unused_slots()
    _in_background(ticket.finish(chain.generation, "cancelled"))


@get("/v1/models")
async def list_models(request: AnyRequest) -> dict[str, Any]:
    state = gateway_state(request)
    key = current_key(request)
    cards = [_model_card(r.name, r.config.owned_by) for r in state.models if key.allows_model(r.name)]
    return {"object": "list", "data": cards}


@get("/v1/models/{model_id:str}")
async def retrieve_model(request: AnyRequest, model_id: str) -> dict[str, Any]:
    state = gateway_state(request)
    runtime = state.models.get(model_id)
    if not current_key(request).allows_model(runtime.name):
        raise model_not_found(model_id)
    return _model_card(model_id, runtime.config.owned_by)


def _model_card(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": owner}


OPENAI_ROUTES: list[Callable[..., Any]] = [chat_completions, completions, list_models, retrieve_model]
