from __future__ import annotations

import asyncio

import pytest

from gateway.errors import ApiError
from gateway.serving.queueing import RETRY_AFTER_SECONDS, SlotQueue


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def hold(queue: SlotQueue, name: str, order: list[str], release: asyncio.Event) -> None:
    async with queue.slot():
        order.append(name)
        await release.wait()


async def test_waiters_get_slots_first_come_first_served() -> None:
    queue = SlotQueue(slots=1, max_queue=10)
    order: list[str] = []
    releases = {name: asyncio.Event() for name in "abcde"}
    tasks = []
    for name in "abcde":
        tasks.append(asyncio.create_task(hold(queue, name, order, releases[name])))
        await settle()
    assert order == ["a"]
    assert (queue.running, queue.waiting) == (1, 4)
    for name in "abcde":
        releases[name].set()
        await settle()
    await asyncio.gather(*tasks)
    assert order == list("abcde")
    assert (queue.running, queue.waiting) == (0, 0)


async def test_a_newcomer_does_not_jump_the_queue() -> None:
    queue = SlotQueue(slots=1, max_queue=10)
    order: list[str] = []
    first, second, third = asyncio.Event(), asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(hold(queue, "running", order, first))
    await settle()
    waiting = asyncio.create_task(hold(queue, "waiting", order, second))
    await settle()
    # The slot is released and a newcomer arrives before the waiter has run again.
    first.set()
    await running
    newcomer = asyncio.create_task(hold(queue, "newcomer", order, third))
    second.set()
    third.set()
    await asyncio.gather(waiting, newcomer)
    assert order == ["running", "waiting", "newcomer"]


async def test_several_slots_run_side_by_side() -> None:
    queue = SlotQueue(slots=3, max_queue=0)
    release = asyncio.Event()
    order: list[str] = []
    tasks = [asyncio.create_task(hold(queue, str(i), order, release)) for i in range(3)]
    await settle()
    assert queue.running == 3
    with pytest.raises(ApiError):
        queue.reserve()
    release.set()
    await asyncio.gather(*tasks)
    assert queue.running == 0


async def test_reserve_refuses_with_503_and_retry_after() -> None:
    queue = SlotQueue(slots=1, max_queue=1)
    first = queue.reserve()
    second = queue.reserve()  # one will run, one will wait
    with pytest.raises(ApiError) as raised:
        queue.reserve()
    assert raised.value.status == 503
    assert raised.value.headers == {"Retry-After": str(RETRY_AFTER_SECONDS)}
    assert raised.value.code == "server_overloaded"
    first.release()
    second.release()
    assert queue.waiting == 0
    queue.reserve(2).release()


async def test_more_choices_than_the_model_can_ever_hold_is_a_400() -> None:
    queue = SlotQueue(slots=1, max_queue=1)
    with pytest.raises(ApiError) as raised:
        queue.reserve(3)
    assert raised.value.status == 400
    assert raised.value.param == "n"


async def test_a_burst_cannot_overshoot_the_limit() -> None:
    # Reservations are taken at admission, before any await: the third of three simultaneous
    # requests on one slot with no queue is refused, the first two are both served in turn.
    queue = SlotQueue(slots=1, max_queue=1)
    reservations = [queue.reserve(), queue.reserve()]
    with pytest.raises(ApiError):
        queue.reserve()
    order: list[str] = []
    release = asyncio.Event()

    async def run(name: str, index: int) -> None:
        async with reservations[index].slot():
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(run("first", 0)), asyncio.create_task(run("second", 1))]
    await settle()
    assert (queue.running, queue.waiting) == (1, 1)
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "second"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_unused_reservation_is_released_when_dropped() -> None:
    queue = SlotQueue(slots=1, max_queue=0)
    reservation = queue.reserve()
    assert queue.waiting == 1
    del reservation  # a response dropped before its body started
    assert queue.waiting == 0
    queue.reserve().release()


async def test_cancelled_waiter_leaves_the_queue() -> None:
    queue = SlotQueue(slots=1, max_queue=2)
    order: list[str] = []
    release = asyncio.Event()
    running = asyncio.create_task(hold(queue, "running", order, release))
    await settle()
    gone = asyncio.create_task(hold(queue, "gone", order, release))
    after = asyncio.create_task(hold(queue, "after", order, release))
    await settle()
    assert queue.waiting == 2
    gone.cancel()
    await settle()
    assert queue.waiting == 1
    release.set()
    await asyncio.gather(running, after)
    assert gone.cancelled()
    assert order == ["running", "after"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_waiter_cancelled_just_as_it_gets_the_slot_passes_it_on() -> None:
    queue = SlotQueue(slots=1, max_queue=2)
    order: list[str] = []
    release_first = asyncio.Event()
    release_rest = asyncio.Event()
    running = asyncio.create_task(hold(queue, "running", order, release_first))
    await settle()
    unlucky = asyncio.create_task(hold(queue, "unlucky", order, release_rest))
    after = asyncio.create_task(hold(queue, "after", order, release_rest))
    await settle()
    release_first.set()
    await asyncio.sleep(0)  # "running" wakes, leaves, and hands the slot over
    # The slot belongs to "unlucky", which has not run yet: cancel it now.
    assert queue.waiting == 1
    assert order == ["running"]
    assert queue.running == 1
    unlucky.cancel()
    release_rest.set()
    await asyncio.gather(running, after)
    assert unlucky.cancelled()
    assert order == ["running", "after"]
    assert (queue.running, queue.waiting) == (0, 0)


async def test_cancelled_holder_releases_its_slot() -> None:
    queue = SlotQueue(slots=1, max_queue=1)
    order: list[str] = []
    never = asyncio.Event()
    holder = asyncio.create_task(hold(queue, "holder", order, never))
    await settle()
    holder.cancel()
    await settle()
    assert queue.running == 0
    release = asyncio.Event()
    release.set()
    await hold(queue, "next", order, release)
    assert order == ["holder", "next"]
