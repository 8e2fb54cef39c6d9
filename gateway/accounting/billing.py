"""Metering backed by accounting: limits and budgets at admission, a usage row at the end."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.accounting.limits import Admission
from gateway.accounting.metering import AdmissionRequest, FinishOnce, Ticket, billed_as
from gateway.accounting.services import Accounting
from gateway.accounting.usage import UsageEntry, UsageStatus
from gateway.accounting.usage.pricing import worst_case_cost
from gateway.errors import model_not_found
from gateway.serving.generation import Generation


class UsageTicket(FinishOnce):
    def __init__(self, accounting: Accounting, request: AdmissionRequest, hold: Admission) -> None:
        self._accounting = accounting
        self._request = request
        self._hold = hold
        self._started = datetime.now(UTC)

    @property
    def headers(self) -> dict[str, str]:
        return self._hold.headers

    async def _finish_once(self, generation: Generation, status: UsageStatus) -> None:
        request = self._request
        # Every admitted request gets its row. One that never reached the engine (its client left
        # while it waited for a slot) processed nothing: it is recorded with no tokens, at no cost.
        reached = generation.reached_backend
        ttft = generation.ttft_ms()
        reasons = sorted(set(generation.finish_reasons.values()))
        model, pricing = billed_as(request, generation)
        entry = UsageEntry(
            request_id=request.request_id,
            key_id=request.key.id,
            model=model,
            endpoint=request.endpoint,
            prompt_tokens=generation.prompt_tokens if reached else 0,
            completion_tokens=generation.completion_tokens,
            input_price_per_million=pricing.input_per_million,
            output_price_per_million=pricing.output_per_million,
            status=status,
            started_at=self._started,
            finished_at=datetime.now(UTC),
            finish_reason=",".join(reasons) or None,
            ttft_ms=None if ttft is None else round(ttft),
            user=request.user,
        )
        try:
            await self._accounting.usage.record(entry)
        finally:
            await self._hold.settle(generation.prompt_tokens + generation.completion_tokens, entry.total_cost)


class AccountingMetering:
    def __init__(self, accounting: Accounting) -> None:
        self._accounting = accounting

    async def admit(self, admission: AdmissionRequest) -> Ticket:
        key = admission.key
        if not key.allows_model(admission.model):
            raise model_not_found(admission.model)
        worst_case = max(
            worst_case_cost(
                admission.prompt_tokens, admission.max_new_tokens, pricing.input_per_million, pricing.output_per_million
            )
            for pricing in (admission.pricing, *admission.fallback_pricing)
        )
        hold = await self._accounting.limiter.admit(
            key, max_tokens=admission.prompt_tokens + admission.max_new_tokens, worst_case_cost=worst_case
        )
        return UsageTicket(self._accounting, admission, hold)
