"""A complete ``Allow`` header on ``OPTIONS`` answers.

Litestar builds a path's ``OPTIONS`` handler with the route that exists when the path's first
handler is registered; handlers registered on the same path later (``GET`` then ``PATCH`` and
``DELETE`` on ``/admin/keys/{id}``) are missing from its ``Allow``. This before-send hook rewrites
the header from the app's final route table.
"""

from __future__ import annotations

import re

from litestar.types import Message, Scope

_ALLOW = b"allow"
_PARAMETER_TYPE = re.compile(r":[^}]*}")


async def complete_allow_header(message: Message, scope: Scope) -> None:
    # Async on purpose: Litestar runs a sync hook in a worker thread, for every message sent.
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    template = scope.get("path_template")
    # The route table spells parameters with their type ("{key_id:str}"), the scope without.
    table = scope["app"].route_handler_method_map
    routes = {_PARAMETER_TYPE.sub("}", path): methods for path, methods in table.items()}
    handlers = routes.get(template) if template else None
    if not handlers:
        return
    methods = ", ".join(sorted(str(method) for method in handlers if method != "websocket" and method != "asgi"))
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _ALLOW]
    headers.append((_ALLOW, methods.encode()))
    message["headers"] = headers
