"""Request bodies as JSON: the one place where a route's bytes become values, for every API.

A body counts as JSON when its ``Content-Type`` says so (``application/json`` or a ``+json`` type)
or when it names none; a form or text body is refused instead of being guessed at. Every way a body
can be wrong is a 400 naming the field where one is known: malformed JSON, bytes that are not UTF-8,
nesting deeper than the decoder's stack allows, a wrong type or an out-of-range value. Values the
schema leaves open (``Any``: key metadata, prediction inputs) are also refused past
``MAX_JSON_DEPTH`` levels, so that nothing stored or echoed later has to encode them.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request

from gateway.errors import invalid_request

MAX_JSON_DEPTH = 32
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)
_PATH = re.compile(r"at `\$((?:\.[A-Za-z_][\w]*|\[\d+\]|\[\.\.\.\])+)`")


async def json_bytes(request: Request[Any, Any, Any]) -> bytes:
    """The body of a request that says it is JSON (or says nothing); 400 for any other type."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _JSON_MEDIA_TYPE.fullmatch(content_type.split(";", 1)[0].strip()):
        raise invalid_request(
            "The request body must be JSON, sent with 'Content-Type: application/json' "
            f"(this request said {content_type.split(';', 1)[0].strip()[:64]!r}).",
            code="invalid_content_type",
        )
    return await request.body()


def _param_from_path(message: str) -> str | None:
    match = _PATH.search(message)
    if match is None:
        return None
    # OpenAI spells nested params "messages.[0].content"; msgspec writes a map's key as "[...]".
    path = match.group(1).split("[...]")[0]
    return path.replace("[", ".[").lstrip(".") or None


def decode_body[T](body: bytes, schema: type[T]) -> T:
    """Decode a JSON body, turning every decoding or validation failure into a 400."""
    if not body.strip():
        raise invalid_request("The request body is empty; expected a JSON object.")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = _param_from_path(text)
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            field = f"{param}.{field}" if param else field
            raise invalid_request(f"Missing required parameter: '{field}'.", param=field) from exc
        raise invalid_request(f"Invalid request: {text}", param=param, code="invalid_value") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        reason = "it is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
        raise invalid_request(
            f"We could not parse the JSON body of your request ({reason}). The body must be a JSON object."
        ) from None
    except RecursionError:
        raise invalid_request(
            f"The JSON body of your request is nested too deeply; values may nest {MAX_JSON_DEPTH} levels."
        ) from None


def check_depth(value: Any, param: str, limit: int = MAX_JSON_DEPTH) -> None:
    """400 when ``value`` (decoded JSON) nests more than ``limit`` arrays and objects."""
    level: list[tuple[Any, int]] = [(value, 1)]
    while level:
        item, depth = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            raise invalid_request(f"'{param}' nests more than {limit} levels of arrays and objects.", param=param)
        level.extend((child, depth + 1) for child in children)
