"""Admission from an HTTP request: the one place a route's request becomes an ``AdmissionRequest``.

Both the OpenAI and the Replicate routes admit through ``admit``. It takes the authenticated key
and the request id from the request, the model's name and prices from its runtime, and keeps in
the request's scope what the request observer reads once the response is sent: the model (set
before admission, so a refusal is counted under its model too) and the ticket (after).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Request

from gateway.accounting.metering import AdmissionRequest, Ticket
from gateway.api.auth import current_key
from gateway.serving.registry import ModelRuntime
from gateway.state import OBSERVED_MODEL_SCOPE_KEY, OBSERVED_TICKET_SCOPE_KEY, gateway_state, request_id


async def admit(
    request: Request[Any, Any, Any],
    runtime: ModelRuntime,
    *,
    endpoint: str,
    prompt_tokens: int,
    max_new_tokens: int,
    user: str | None,
    fallbacks: Sequence[ModelRuntime] = (),
) -> Ticket:
    """Admit the request through the app's metering; raises ``ApiError`` (404, 429) when refused.

    ``fallbacks`` are the models that may serve instead (the key may use each): a budget holds
    the worst case at the highest of their prices."""
    admission = AdmissionRequest(
        key=current_key(request),
        model=runtime.name,
        pricing=runtime.config.pricing,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        request_id=request_id(request),
        endpoint=endpoint,
        user=user,
        fallback_pricing=tuple(model.config.pricing for model in fallbacks),
    )
    scope_state = request.scope["state"]
    # Before admission, so a refusal (404, 429) is counted under its model too.
    scope_state[OBSERVED_MODEL_SCOPE_KEY] = runtime.name
    ticket = await gateway_state(request).metering.admit(admission)
    scope_state[OBSERVED_TICKET_SCOPE_KEY] = ticket
    return ticket
