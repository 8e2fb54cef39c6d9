"""Metering backed by accounting: limits and budgets at admission, a usage row at the end."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from litestar import Request

from gateway.accounting.keys import ApiKeyInfo
from gateway.accounting.limits import Admission
from gateway.accounting.metering import FinishOnce, Ticket
from gateway.accounting.services import Accounting
from gateway.accounting.usage import UsageEntry, UsageStatus
from gateway.accounting.usage.pricing import worst_case_cost
from gateway.api.auth import current_key
from gateway.errors import model_not_found
from gateway.serving.generation import Generation
from gateway.serving.registry import ModelRuntime


class UsageTicket(FinishOnce):
    def __init__(
        self,
        accounting: Accounting,
        key: ApiKeyInfo,
        runtime: ModelRuntime,
        admission: Admission,
        *,
        request_id: str,
        endpoint: str,
        user: str | None,
    ) -> None:
        self._accounting = accounting
        self._key = key
        self._runtime = runtime
        self._admission = admission
        self._request_id = request_id
        self._endpoint = endpoint
        self._user = user
        self._started = datetime.now(UTC)

    @property
    def headers(self) -> dict[str, str]:
        return self._admission.headers

    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        if not generation.reached_backend:
            # Refused or abandoned before any engine work (queue, early disconnect): no usage.
            await self._admission.settle(0, Decimal(0))
            return
        pricing = self._runtime.config.pricing
        ttft = generation.ttft_ms()
        reasons = sorted(set(generation.finish_reasons.values()))
        entry = UsageEntry(
            request_id=self._request_id,
            key_id=self._key.id,
            model=self._runtime.name,
            endpoint=self._endpoint,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            input_price_per_million=pricing.input_per_million,
            output_price_per_million=pricing.output_per_million,
            status=status,
            started_at=self._started,
            finished_at=datetime.now(UTC),
            finish_reason=",".join(reasons) or None,
            ttft_ms=None if ttft is None else round(ttft),
            user=self._user,
        )
        try:
            await self._accounting.usage.record(entry)
        finally:
            await self._admission.settle(generation.prompt_tokens + generation.completion_tokens, entry.total_cost)


class AccountingMetering:
    def __init__(self, accounting: Accounting) -> None:
        self._accounting = accounting

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
        from gateway.state import request_id

        key = current_key(request)
        if not key.allows_model(runtime.name):
            raise model_not_found(runtime.name)
        pricing = runtime.config.pricing
        worst_case = worst_case_cost(
            prompt_tokens, max_new_tokens, pricing.input_per_million, pricing.output_per_million
        )
        admission = await self._accounting.limiter.admit(
            key, max_tokens=prompt_tokens + max_new_tokens, worst_case_cost=worst_case
        )
        return UsageTicket(
            self._accounting,
            key,
            runtime,
            admission,
            request_id=request_id(request),
            endpoint=endpoint,
            user=user,
        )
