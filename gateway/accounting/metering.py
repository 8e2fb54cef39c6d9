"""The seam between a request's generation and accounting (limits, budgets, usage rows).

The OpenAI and Replicate routes call ``admit`` before generating and ``Ticket.finish`` once
the outcome is known, before the response's final bytes go out, so a response the client saw
complete always has its usage committed.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, Protocol

from litestar import Request

from gateway.accounting.usage.entry import UsageStatus
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime

__all__ = ["FinishOnce", "Metering", "NoMetering", "Ticket", "UsageStatus", "usage_status"]


class Ticket(Protocol):
    @property
    def headers(self) -> dict[str, str]:
        """Rate-limit headers to send with the response."""
        ...

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        """Record usage and settle reservations. Idempotent: only the first call counts."""
        ...


class FinishOnce(abc.ABC):
    """A ticket whose first ``finish`` does the work; later or concurrent calls wait for it.

    The work is shielded: a request cancelled while its usage is being recorded (a client that
    went away) does not cut the recording short.
    """

    _finishing: asyncio.Future[None] | None = None

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish_once(generation, status))
        await asyncio.shield(self._finishing)

    @abc.abstractmethod
    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        """The work of the first ``finish``."""


class Metering(Protocol):
    async def admit(
        self,
        request: Request[Any, Any, Any],
        runtime: ModelRuntime,
        *,
        endpoint: str,
        prompt_tokens: int,
        max_new_tokens: int,
        user: str | None,
    ) -> Ticket:
        """Check limits and reserve budget; raises ``ApiError`` (429) when refused."""
        ...


class _FreeTicket:
    @property
    def headers(self) -> dict[str, str]:
        return {}

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        return None


class NoMetering:
    """No limits and no usage rows (a gateway without accounting, e.g. a GPU worker behind another)."""

    async def admit(
        self,
        request: Request[Any, Any, Any],
        runtime: ModelRuntime,
        *,
        endpoint: str,
        prompt_tokens: int,
        max_new_tokens: int,
        user: str | None,
    ) -> Ticket:
        return _FreeTicket()


def usage_status(generation: Generation) -> UsageStatus:
    """The outcome of a generation that ran to its end."""
    reasons = set(generation.finish_reasons.values())
    if "length" in reasons:
        return "length"
    return "stopped" if generation.stop_sequence_hit else "completed"
