"""Replicate-compatible routes: create, get, list, cancel and stream predictions.

Replicate's clients work unchanged against ``base_url = <gateway>`` (their paths start with ``/v1``).
A model is addressed as ``owner/name`` (a model name or one of its ``aliases``, e.g.
``meta/llama-2-70b-chat``; the ``name`` part alone also matches a served model) or, on
``POST /v1/predictions``, by ``version``: a model name, an alias (a pinned version id may be
configured as one), or ``owner/name:version``. Errors on these routes are problem details.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from collections.abc import Iterable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from gateway.accounting.fail_closed import database_unavailable, is_database_outage, needing_database
from gateway.api.admission import admit
from gateway.api.auth import current_key
from gateway.api.client_gone import CLIENT_CLOSED_REQUEST, left_before_body
from gateway.api.heavy_work import sized_work
from gateway.api.json_bodies import check_depth, json_bytes
from gateway.api.replicate import predictions
from gateway.api.replicate.inputs import parse_input
from gateway.api.replicate.predictions import WEBHOOK_EVENTS, Prediction, new_prediction_id
from gateway.api.replicate.problems import PROBLEM_MEDIA_TYPE, InvalidField, InvalidInput, Problem, invalid
from gateway.api.replicate.prompt import prompt_ids
from gateway.api.replicate.runner import PredictionService, prediction_service
from gateway.api.replicate.stream import prediction_events, resume_index
from gateway.api.replicate.versions import model_json, version_id, version_json
from gateway.errors import ApiError, echo
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime
from gateway.state import gateway_state, request_id

AnyRequest = Request[Any, Any, Any]
ENDPOINT = "/v1/predictions"
MAX_WAIT_SECONDS = 60
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_NOT_FOUND = "The requested resource could not be found."


def _base_url(request: AnyRequest) -> str:
    return str(request.base_url).rstrip("/")


def prefer_wait(header: str | None) -> int | None:
    """Seconds to hold the create request open (``Prefer: wait`` or ``wait=N``, N clamped to 1-60)."""
    if not header:
        return None
    for preference in header.split(","):
        token, _, value = preference.split(";")[0].strip().partition("=")
        if token.strip().lower() != "wait":
            continue
        try:
            seconds = int(value.strip().strip('"')) if value.strip() else MAX_WAIT_SECONDS
        except ValueError:
            seconds = MAX_WAIT_SECONDS
        return min(max(seconds, 1), MAX_WAIT_SECONDS)
    return None


async def _json_body(request: AnyRequest) -> dict[str, Any]:
    raw = await json_bytes(request)
    try:
        body = msgspec.json.decode(raw) if raw.strip() else None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        body = None
    if not isinstance(body, dict):
        raise Problem(400, "The request body must be a JSON object in UTF-8.")
    check_depth(body, "body")
    return body


def _lookup(request: AnyRequest, refs: Iterable[str]) -> ModelRuntime | None:
    key = current_key(request)
    runtimes = list(gateway_state(request).models)
    for ref in refs:
        for runtime in runtimes:
            if ref == runtime.name or ref in runtime.config.aliases:
                return runtime if key.allows_model(runtime.name) else None
    return None


def _model_ref(runtime: ModelRuntime) -> str:
    """How predictions name a model created by version: its first ``owner/name`` alias, else owner/name."""
    return next((a for a in runtime.config.aliases if "/" in a), f"{runtime.config.owned_by}/{runtime.name}")


MAX_WEBHOOK_URL = 2048


def _is_web_url(url: object) -> bool:
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL:
        return False
    try:
        parsed = urlsplit(url)
        return parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        return False


def _webhook(body: dict[str, Any]) -> tuple[str | None, tuple[str, ...]]:
    """The webhook URL and the events it wants; ``webhook_completed`` (Replicate's older field) is a
    webhook for the ``completed`` event alone."""
    url = body.get("webhook")
    events: Any = body.get("webhook_events_filter")
    legacy = body.get("webhook_completed")
    if url is None and legacy is not None:
        url, events = legacy, events or ["completed"]
    fields: list[InvalidField] = []
    if url is not None:
        name = "webhook" if body.get("webhook") is not None else "webhook_completed"
        if not _is_web_url(url):
            fields.append(
                InvalidField(name, "format", "webhook must be an absolute http(s) URL of at most 2048 characters")
            )
    if events is None:
        chosen = WEBHOOK_EVENTS
    elif isinstance(events, list) and events and all(isinstance(e, str) and e in WEBHOOK_EVENTS for e in events):
        chosen = tuple(e for e in WEBHOOK_EVENTS if e in events)
    else:
        fields.append(
            InvalidField(
                "webhook_events_filter", "enum", f"webhook_events_filter must be a list of {', '.join(WEBHOOK_EVENTS)}"
            )
        )
        chosen = ()
    if body.get("input") is None:
        fields.append(InvalidField("input", "required", "input is required"))
    if fields:
        raise InvalidInput(fields)
    return url, chosen


async def _create(
    request: AnyRequest, runtime: ModelRuntime, body: dict[str, Any], *, model: str, version: str
) -> Response[Any]:
    wait = prefer_wait(request.headers.get("prefer"))
    webhook, webhook_events = _webhook(body)
    inputs = parse_input(body["input"])
    text_size = len(inputs.prompt) + len(inputs.system_prompt or "") + len(inputs.prompt_template or "")
    ids = await sized_work(text_size, prompt_ids, inputs, runtime)
    room = runtime.usable_context_length - len(ids)
    if room <= 0:
        raise invalid(
            "input.prompt",
            "value",
            f"The prompt is {len(ids)} tokens; this model's context of {runtime.usable_context_length} tokens "
            "leaves no room for output",
        )
    sampling = inputs.sampling(room)
    reservation = runtime.queue.reserve(1)
    try:
        ticket = await admit(
            request, runtime, endpoint=ENDPOINT, prompt_tokens=len(ids), max_new_tokens=sampling.max_tokens, user=None
        )
    except BaseException:
        reservation.release()
        raise
    generation = Generation(runtime, request_id(request), ids, sampling, inputs.stop_sequences, reservation=reservation)
    service = prediction_service(request.app)
    prediction = Prediction(
        id=new_prediction_id(),
        owner=current_key(request).id,
        model=model,
        version=version,
        input=dict(body["input"]),
        base_url=_base_url(request),
        webhook=webhook,
        webhook_events=webhook_events,
    )
    try:
        async with needing_database("storing a prediction"):
            await service.create(prediction)
    except BaseException:
        # Nothing ran: the request is settled (a row with no tokens) and its slot given back.
        reservation.release()
        await ticket.finish(generation, "failed")
        raise
    service.start(prediction, generation, ticket)
    headers = {**ticket.headers, "Location": f"{prediction.base_url}{ENDPOINT}/{prediction.id}"}
    if wait is None:
        return Response(prediction.to_json(), status_code=201, headers=headers)
    headers["Preference-Applied"] = f"wait={wait}"
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            await prediction.wait_done()
    # Replicate answers an unfinished wait with "starting", which tells its clients to go on polling.
    return Response(prediction.to_json(pending_as="starting"), status_code=201, headers=headers)


def _model(request: AnyRequest, owner: str, name: str) -> ModelRuntime:
    ref = f"{owner}/{name}"
    runtime = _lookup(request, (ref, name))
    if runtime is None:
        raise Problem(404, f"The model {echo(ref)} does not exist, or you do not have access to it.")
    return runtime


@post("/models/{owner:str}/{name:str}/predictions", status_code=201)
async def create_model_prediction(request: AnyRequest, owner: str, name: str) -> Response[Any]:
    body = await _json_body(request)
    runtime = _model(request, owner, name)
    return await _create(request, runtime, body, model=f"{owner}/{name}", version=version_id(runtime))


@get("/models/{owner:str}/{name:str}")
async def get_model(request: AnyRequest, owner: str, name: str) -> dict[str, Any]:
    return model_json(_model(request, owner, name), owner, name, _base_url(request))


@get("/models/{owner:str}/{name:str}/versions")
async def list_versions(request: AnyRequest, owner: str, name: str) -> dict[str, Any]:
    runtime = _model(request, owner, name)
    return {"next": None, "previous": None, "results": [version_json(version_id(runtime))]}


@get("/models/{owner:str}/{name:str}/versions/{version:str}")
async def get_version(request: AnyRequest, owner: str, name: str, version: str) -> dict[str, Any]:
    """Any name or alias of the model is one of its versions (a pinned hash is configured as an alias)."""
    runtime = _model(request, owner, name)
    if _lookup(request, (version,)) is not runtime:
        raise Problem(404, f"The version {echo(version)} of {echo(f'{owner}/{name}')} does not exist.")
    return version_json(version)


@post("/predictions", status_code=201)
async def create_prediction(request: AnyRequest) -> Response[Any]:
    body = await _json_body(request)
    version = body.get("version")
    if not isinstance(version, str) or not version.strip():
        raise InvalidInput([InvalidField("version", "required", "version is required")])
    base, _, pinned = version.partition(":")
    refs = [version, *((pinned, base) if pinned else ()), base.rpartition("/")[2]]
    runtime = _lookup(request, refs)
    if runtime is None:
        raise Problem(404, f"The version {echo(version)} does not exist, or you do not have access to it.")
    # The prediction shows the model as asked for (owner/name) and the version the client pinned, if any.
    model = base if "/" in base else _model_ref(runtime)
    shown_version = pinned or (version_id(runtime) if "/" in base else version)
    return await _create(request, runtime, body, model=model, version=shown_version)


async def _owned(request: AnyRequest, prediction_id: str) -> tuple[PredictionService, Prediction]:
    service = prediction_service(request.app)
    async with needing_database("reading a prediction"):
        prediction = await service.get(prediction_id, current_key(request).id)
    if prediction is None:
        raise Problem(404, _NOT_FOUND)
    return service, prediction


@get("/predictions/{prediction_id:str}")
async def get_prediction(request: AnyRequest, prediction_id: str) -> dict[str, Any]:
    _, prediction = await _owned(request, prediction_id)
    return prediction.to_json()


@post("/predictions/{prediction_id:str}/cancel", status_code=200)
async def cancel_prediction(request: AnyRequest, prediction_id: str) -> dict[str, Any]:
    service, prediction = await _owned(request, prediction_id)
    return (await service.cancel(prediction)).to_json()


@get("/predictions/{prediction_id:str}/stream")
async def stream_prediction(request: AnyRequest, prediction_id: str) -> Stream:
    service, prediction = await _owned(request, prediction_id)
    start = resume_index(request.headers.get("last-event-id"))
    reread = None if service.runs_here(prediction) else partial(service.records.get, prediction.id, prediction.owner)
    return Stream(prediction_events(prediction, start, reread), media_type="text/event-stream", headers=SSE_HEADERS)


@get("/webhooks/default/secret")
async def webhook_secret(request: AnyRequest) -> dict[str, Any]:
    """The calling key's webhook signing secret (Replicate's ``webhooks.default.secret()``)."""
    service = prediction_service(request.app)
    async with needing_database("reading the webhook secret"):
        return {"key": await service.webhook_secrets.secret(current_key(request).id)}


def _cursor(direction: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{direction}{position}".encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[int | None, int | None]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, position = text[0], int(text[1:])
    except (binascii.Error, UnicodeDecodeError, ValueError, IndexError):
        raise Problem(400, "The cursor is not valid.") from None
    if direction == "b":
        return position, None
    if direction == "a":
        return None, position
    raise Problem(400, "The cursor is not valid.")


@get("/predictions")
async def list_predictions(request: AnyRequest, cursor: str | None = None) -> dict[str, Any]:
    """The caller's predictions, newest first, ``predictions.PAGE_SIZE`` per page."""
    before, after = _read_cursor(cursor) if cursor else (None, None)
    service = prediction_service(request.app)
    async with needing_database("listing predictions"):
        page = await service.page(current_key(request).id, before=before, after=after, size=predictions.PAGE_SIZE)
    url = f"{_base_url(request)}{ENDPOINT}?cursor="
    return {
        "next": None if page.next_before is None else url + _cursor("b", page.next_before),
        "previous": None if page.previous_after is None else url + _cursor("a", page.previous_after),
        "results": [p.to_json() for p in page.results],
    }


def _problem_response(_: AnyRequest, exc: Problem) -> Response[Any]:
    return Response(exc.body(), status_code=exc.status, headers=exc.headers, media_type=PROBLEM_MEDIA_TYPE)


def _problem_api_error_response(request: AnyRequest, exc: ApiError) -> Response[Any]:
    return _problem_response(request, Problem.from_api_error(exc))


_REPLICATE_PATH = re.compile(r"/v1/(?:predictions(?:/.*)?|webhooks(?:/.*)?|models/[^/]+/[^/]+(?:/.*)?)")


def is_replicate_path(path: str) -> bool:
    """Whether ``path`` is one of this router's, also when no route matched it (404, 405): the
    app's own error handlers, which answer those, then use Replicate's shape too."""
    return _REPLICATE_PATH.fullmatch(path) is not None


def problem_http_error_response(request: AnyRequest, exc: HTTPException) -> Response[Any]:
    status = CLIENT_CLOSED_REQUEST if left_before_body(exc) else exc.status_code
    problem = Problem(status, str(exc.detail), headers=dict(exc.headers or {}))
    return _problem_response(request, problem)


def _problem_unexpected_error_response(request: AnyRequest, exc: Exception) -> Response[Any]:
    if is_database_outage(exc):
        request.logger.warning("database unavailable: %s", type(exc).__name__)
        return _problem_response(request, Problem.from_api_error(database_unavailable()))
    request.logger.exception("unhandled error", exc_info=exc)
    return _problem_response(request, Problem(500, "The server had an error while processing your request."))


REPLICATE_ROUTES = Router(
    path="/v1",
    route_handlers=[
        create_model_prediction,
        create_prediction,
        get_model,
        list_versions,
        get_version,
        list_predictions,
        get_prediction,
        cancel_prediction,
        stream_prediction,
        webhook_secret,
    ],
    exception_handlers={
        Problem: _problem_response,
        ApiError: _problem_api_error_response,
        HTTPException: problem_http_error_response,
        Exception: _problem_unexpected_error_response,
    },
)
