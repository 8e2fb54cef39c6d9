"""A streamed response that settles its request however the response ends.

A generator's ``finally`` runs only if the generator started. When the client leaves before
Litestar starts iterating the body (it went away right after the headers, while the request
waited for a slot), the generator is dropped unstarted and its clean-up would wait for the
garbage collector, which may not come for a long time. ``SettledStream`` closes the body's
generator and calls ``on_close`` as soon as the response is over: sent in full, cut off, or
never begun.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Scope, Send
from litestar.utils.helpers import get_enum_string_value


class _SettlingResponse(ASGIStreamingResponse):
    __slots__ = ("_on_close",)

    def __init__(self, *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A generator left at a ``yield`` (its send was cut off) still holds its slot until
            # closed; closing it runs its own clean-up first, with the counts it has.
            aclose = getattr(self.iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            self._on_close()


class SettledStream(Stream):
    def __init__(self, content: Any, *, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    def to_asgi_response(
        self,
        app: Any,
        request: Any,
        *,
        headers: dict[str, str] | None = None,
        cookies: Iterable[Any] | None = None,
        media_type: str | None = None,
        **kwargs: Any,
    ) -> ASGIResponse:
        return _SettlingResponse(
            on_close=self._on_close,
            background=self.background or kwargs.get("background"),
            content_length=0,
            cookies=self.cookies if cookies is None else itertools.chain(self.cookies, cookies),
            encoded_headers=kwargs.get("encoded_headers"),
            encoding=self.encoding,
            headers={**headers, **self.headers} if headers is not None else self.headers,
            is_head_response=kwargs.get("is_head_response", False),
            iterator=self.iterator,
            media_type=get_enum_string_value(media_type or self.media_type or "application/json"),
            status_code=self.status_code or kwargs.get("status_code"),
        )
