"""Work that grows with a request's size runs off the event loop, so one large request cannot
stall the others (or ``/health``).

Building a prompt from a body near ``max_body_bytes`` takes about half a second (tokenizing a
megabyte of text); on the event loop every other request would wait that long. Small bodies stay on
the loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

OFF_LOOP_BODY_BYTES = 32 * 1024


async def sized_work[**P, T](body_bytes: int, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``work(*args, **kwargs)``, in a worker thread when the body it comes from is large."""
    if body_bytes < OFF_LOOP_BODY_BYTES:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)
