"""Admin routes (admin-scope keys only): manage API keys and read everyone's usage.

``GET /admin/usage`` takes the filters, groupings, buckets and formats of ``gateway.api.usage_reports``;
``GET /admin/usage/latency`` and ``GET /admin/usage/budgets`` are ``gateway.api.usage_insights``'.

``POST /admin/keys`` answers 201 with the key's fields and, this once, its plaintext ``key``.
Keys are never deleted: ``POST /admin/keys/{id}/revoke`` and ``DELETE /admin/keys/{id}`` both
revoke, and the key stops working on every replica within ``key_cache_seconds``. Errors use
OpenAI's envelope: 400 for invalid fields, 404 for an unknown key id.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post

from gateway.accounting.keys import ApiKeyInfo, InvalidKeyFields, KeyNotFound, KeyStore, KeyUpdate, NewKey, key_fields
from gateway.api.auth import ADMIN
from gateway.api.json_bodies import check_depth, decode_body, json_bytes
from gateway.api.usage_insights import all_budgets, all_latency
from gateway.api.usage_reports import run_report, usage_query
from gateway.errors import ApiError, echo, invalid_request
from gateway.state import gateway_state

AnyRequest = Request[Any, Any, Any]
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")
_FIELDS = frozenset(NewKey.__struct_fields__)


def key_json(info: ApiKeyInfo) -> dict[str, Any]:
    """A key as the admin API shows it: every field, never a secret; money as a decimal string."""
    return {"object": "api_key", **key_fields(info)}


def _store(request: AnyRequest) -> KeyStore:
    return gateway_state(request).accounting.keys


async def _decode_fields[T: (NewKey, KeyUpdate)](request: AnyRequest, schema: type[T]) -> T:
    body = await json_bytes(request)
    try:
        fields = msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Object contains unknown field"):
            field = text.split("`")[1]
            raise invalid_request(
                f"Unrecognized request argument supplied: {field}.", param=field, code="unknown_parameter"
            ) from None
        # Every other failure gets the same 400 (naming the field) as the OpenAI routes give.
        fields = decode_body(body, schema)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        fields = decode_body(body, schema)
    if isinstance(fields.metadata, dict):
        check_depth(fields.metadata, "metadata")
    return fields


def _not_found(message: str) -> ApiError:
    message = echo(message)  # it quotes the id from the path, which may be long
    return ApiError(404, f"{message[:1].upper()}{message[1:]}.", param="key_id", code="key_not_found")


async def _key_call[T](call: Awaitable[T]) -> T:
    """Await a key-store call, answering its refusals as OpenAI errors."""
    try:
        return await call
    except KeyNotFound as exc:
        raise _not_found(str(exc)) from None
    except InvalidKeyFields as exc:
        # Messages begin with the field they are about ("budget_usd must be ...").
        field = str(exc).split(" ", 1)[0]
        param = field if field in _FIELDS else None
        raise invalid_request(str(exc), param=param, code="invalid_value") from None


@post("/keys", status_code=201)
async def create_key(request: AnyRequest) -> dict[str, Any]:
    new = await _decode_fields(request, NewKey)
    info, plaintext = await _key_call(_store(request).create(new))
    return {**key_json(info), "key": plaintext}


@get("/keys")
async def list_keys(request: AnyRequest) -> dict[str, Any]:
    flag = (request.query_params.get("include_revoked") or "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise invalid_request(
            f"'{echo(flag)}' is not a valid 'include_revoked': use true or false.",
            param="include_revoked",
            code="invalid_value",
        )
    found = await _store(request).list(include_revoked=flag in _TRUE)
    return {"object": "list", "data": [key_json(info) for info in found]}


@get("/keys/{key_id:str}")
async def get_key(request: AnyRequest, key_id: str) -> dict[str, Any]:
    info = await _store(request).get(key_id)
    if info is None:
        raise _not_found(f"no API key has id {key_id!r}")
    return key_json(info)


@patch("/keys/{key_id:str}")
async def update_key(request: AnyRequest, key_id: str) -> dict[str, Any]:
    update = await _decode_fields(request, KeyUpdate)
    info = await _key_call(_store(request).update(key_id, update))
    return key_json(info)


@post("/keys/{key_id:str}/revoke", status_code=200)
async def revoke_key(request: AnyRequest, key_id: str) -> dict[str, Any]:
    info = await _key_call(_store(request).revoke(key_id))
    return key_json(info)


@delete("/keys/{key_id:str}", status_code=200)
async def delete_key(request: AnyRequest, key_id: str) -> dict[str, Any]:
    """Revokes: keys stay in the table so that their usage rows keep their owner."""
    info = await _key_call(_store(request).revoke(key_id))
    return key_json(info)


@get("/usage")
async def all_usage(request: AnyRequest) -> Response[Any]:
    """Every key's usage (``key`` narrows it to one), grouped by key unless asked otherwise."""
    return await run_report(request, usage_query(request, default_group="key"))


ADMIN_ROUTES = Router(
    path="/admin",
    route_handlers=[
        create_key,
        list_keys,
        get_key,
        update_key,
        revoke_key,
        delete_key,
        all_usage,
        all_latency,
        all_budgets,
    ],
    opt={ADMIN: True},
)
