"""The replica pool: the order requests try replicas in, ejection, restoration, what the observer hears."""

from __future__ import annotations

from backends.replica_pool import ReplicaPool

URLS = ["http://a/v1", "http://b/v1", "http://c/v1"]


class Heard:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def served(self, replica: str) -> None:
        self.events.append(("served", replica))

    def skipped(self, replica: str, reason: str) -> None:
        self.events.append(("skipped", replica, reason))

    def rotation(self, replica: str, *, in_rotation: bool) -> None:
        self.events.append(("rotation", replica, str(in_rotation)))


def _urls(pool: ReplicaPool) -> list[str]:
    return [replica.url for replica in pool.order()]


def test_replicas_in_rotation_come_first_fewest_in_flight_first() -> None:
    pool = ReplicaPool("m", URLS, eject_after_failures=1)
    a, b, _ = pool.replicas
    a.in_flight, b.in_flight = 2, 1
    assert _urls(pool) == ["http://c/v1", "http://b/v1", "http://a/v1"]
    pool.skipped(pool.replicas[2], "connect_error", "refused")
    # Out of rotation, and still tried: last.
    assert _urls(pool) == ["http://b/v1", "http://a/v1", "http://c/v1"]


def test_consecutive_failures_eject_and_a_finished_generation_resets_the_count() -> None:
    pool = ReplicaPool("m", URLS, eject_after_failures=2)
    heard = Heard()
    pool.observe(heard)
    a = pool.replicas[0]
    pool.skipped(a, "status_5xx", "answered 500")
    pool.succeeded(a)
    pool.skipped(a, "timeout", "no first token")
    assert a.in_rotation
    pool.failed(a)  # a stream broken after its first token counts too
    assert not a.in_rotation
    assert pool.out_of_rotation() == [a]
    assert heard.events[:3] == [("rotation", url, "True") for url in URLS]
    assert heard.events[-1] == ("rotation", "http://a/v1", "False")


def test_429_moves_on_without_counting_as_a_failure() -> None:
    pool = ReplicaPool("m", URLS, eject_after_failures=1)
    pool.skipped(pool.replicas[0], "status_429", "busy")
    assert pool.replicas[0].in_rotation
    assert pool.replicas[0].failures == 0


def test_a_replica_comes_back_by_probe_or_by_serving_a_last_resort() -> None:
    pool = ReplicaPool("m", URLS, eject_after_failures=1)
    heard = Heard()
    pool.observe(heard)
    a, b, _ = pool.replicas
    pool.failed(a)
    pool.failed(b)
    pool.restore(a, via="probe")
    pool.served(b)
    assert a.in_rotation
    assert b.in_rotation
    assert heard.events[-3:] == [
        ("rotation", "http://a/v1", "True"),
        ("rotation", "http://b/v1", "True"),
        ("served", "http://b/v1"),
    ]
