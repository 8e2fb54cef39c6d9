"""Clients leaving mid-stream or while queued leave no slot, reservation or wrong bill behind.

Runs the ``bench.faults.client_disconnects`` scenario with limits in the gateway's process and
in Redis.
"""

from __future__ import annotations

import pytest

from bench.faults import client_disconnects


def assert_nothing_left_behind(result: client_disconnects.ClientDisconnectsResult) -> None:
    assert result.ok, (result, result.notes)
    assert result.queue_left == 0
    assert result.engine_active == 0
    assert result.misbilled_rows == 0
    assert result.slots_refused_after == 0
    assert result.exact_fit_ok
    assert result.usage_rows == result.expected_rows
    # Clients really left while queued and mid-stream, and their requests were billed as cancelled.
    assert result.clients.get("left while queued", 0) > 0
    assert result.clients.get("left at the 200", 0) > 0
    assert result.clients.get("left mid-stream", 0) > 0
    assert result.row_statuses.get("cancelled", 0) >= result.clients["left mid-stream"]


async def test_clients_leaving_leave_nothing_behind() -> None:
    assert_nothing_left_behind(await client_disconnects.run(1))


@pytest.mark.redis
async def test_clients_leaving_leave_nothing_behind_in_redis(redis_server: str) -> None:
    assert_nothing_left_behind(await client_disconnects.run(1, redis_url=redis_server))


@pytest.mark.long
async def test_five_hundred_clients_leaving_leave_nothing_behind() -> None:
    assert_nothing_left_behind(await client_disconnects.run(10))


@pytest.mark.long
@pytest.mark.redis
async def test_five_hundred_clients_leaving_leave_nothing_behind_in_redis(redis_server: str) -> None:
    assert_nothing_left_behind(await client_disconnects.run(10, redis_url=redis_server))
