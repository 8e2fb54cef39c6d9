"""The seam between a request's generation and accounting (limits, budgets, usage rows).

The OpenAI and Replicate routes call ``admit`` (through the HTTP layer's ``admission`` module,
which builds the ``AdmissionRequest`` from the request) before generating and ``Ticket.finish``
once the outcome is known, before the response's final bytes go out, so a response the client
saw complete always has its usage committed.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Protocol

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.usage.entry import UsageStatus
from gateway.serving.generation import Generation
from gateway.settings import Pricing

__all__ = [
    "AdmissionRequest",
    "FinishOnce",
    "Metering",
    "NoMetering",
    "Ticket",
    "UsageStatus",
    "billed_as",
    "usage_status",
]


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """What a route asks of accounting before generating; no web-framework type inside.

    (Not ``Admission``: that is the limiter's hold on a request's limits, ``limits.Admission``.)
    """

    key: ApiKeyInfo
    """The authenticated key the request is made with."""
    model: str
    """The served model's configured name (never an alias): limits, prices and usage rows use it."""
    pricing: Pricing
    """The model's prices, copied into the usage row."""
    prompt_tokens: int
    max_new_tokens: int
    """The most tokens the request may generate, all ``n`` choices together."""
    request_id: str
    endpoint: str
    """``/v1/chat/completions``, ``/v1/completions`` or ``/v1/predictions``."""
    user: str | None
    """The OpenAI ``user`` field; None where the API has none (Replicate)."""
    fallback_pricing: tuple[Pricing, ...] = ()
    """Prices of the models that may serve the request instead (``gateway.serving.fallbacks``):
    a budget's worst case is reserved at the highest of all."""


def billed_as(admission: AdmissionRequest, generation: Generation) -> tuple[str, Pricing]:
    """The model and prices a request's usage names: the admitted model's, or those of the
    fallback model whose generation served it."""
    served = generation.runtime
    if served.name == admission.model:
        return admission.model, admission.pricing
    return served.name, served.config.pricing


class Ticket(Protocol):
    @property
    def headers(self) -> dict[str, str]:
        """Rate-limit headers to send with the response."""
        ...

    def finishing(self, generation: Generation, status: UsageStatus) -> asyncio.Future[None]:
        """Start recording usage and settling reservations, on the first call only; the future
        is done once that work is, and no cancellation of a caller cuts it short."""
        ...

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        """``finishing``, waited for. Idempotent: only the first call counts."""
        ...


class FinishOnce(abc.ABC):
    """A ticket whose first ``finish`` does the work; later or concurrent calls wait for it.

    The work runs in a task of its own: a request cancelled while its usage is being recorded
    (a client that went away) does not cut the recording short. The task starts eagerly, in the
    caller's turn of the event loop: work that does not wait (a row committed at once) is done
    when ``finishing`` returns, and work that waits has already been handed on.
    """

    _finishing: asyncio.Future[None] | None = None

    def finishing(self, generation: Generation, status: UsageStatus) -> asyncio.Future[None]:
        if self._finishing is None:
            loop = asyncio.get_running_loop()  # named: with none, 3.12.1 fails to start it eagerly
            self._finishing = asyncio.Task(self._finish_once(generation, status), loop=loop, eager_start=True)
        return self._finishing

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        await asyncio.shield(self.finishing(generation, status))

    @abc.abstractmethod
    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        """The work of the first ``finish``."""


class Metering(Protocol):
    async def admit(self, admission: AdmissionRequest) -> Ticket:
        """Check the key's model access, limits and budget, and reserve the worst case.

        Raises ``ApiError``: 404 when the key may not use the model, 429 when refused.
        """
        ...


class _FreeTicket:
    @property
    def headers(self) -> dict[str, str]:
        return {}

    def finishing(self, generation: Generation, status: UsageStatus) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def finish(self, generation: Generation, status: UsageStatus) -> None:
        return None


class NoMetering:
    """No limits and no usage rows (a gateway without accounting, e.g. a GPU worker behind another)."""

    async def admit(self, admission: AdmissionRequest) -> Ticket:
        return _FreeTicket()


def usage_status(generation: Generation) -> UsageStatus:
    """The outcome of a generation that ran to its end."""
    reasons = set(generation.finish_reasons.values())
    if "length" in reasons:
        return "length"
    return "stopped" if generation.stop_sequence_hit else "completed"
