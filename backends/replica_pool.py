"""The replicas of one remote model: the order a request tries them in, and which are in rotation.

Order: each request tries every replica at most once, those in rotation first, fewest requests
in flight first, then those out of rotation (fewest in flight first too). A replica out of
rotation is tried only after every one in rotation failed this request: when all of them are out,
trying them still beats refusing without a try.

Rotation: ``eject_after_failures`` consecutive failures (no first token, or a stream broken
after it) take a replica out of rotation; a generation it streams to its end resets the count.
It comes back into rotation when a probe finds it answering again (the backend probes), or at
once when it sends the first token of a request it was tried for as a last resort. A ``429``
moves the request on without counting as a failure: the replica is busy, not broken.

Every skip, ejection and restoration is logged (``replica_skipped`` with ``reason``,
``replica_ejected``, ``replica_restored``) and told to the ``ReplicaObserver`` the gateway
attaches for its metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from backends.base import ReplicaObserver

SkipReason = Literal["connect_error", "disconnected", "timeout", "status_5xx", "status_429", "stream_error"]
"""Why a request left a replica before its first token: the connection was refused (or its
address did not resolve), the connection broke, no first token came in time, the worker answered
5xx or 429, or its stream was not what OpenAI sends."""

_logger = structlog.get_logger("backends.replicas")


@dataclass(slots=True)
class Replica:
    url: str
    in_flight: int = 0
    failures: int = 0
    """Consecutive failures since its last generation streamed to its end."""
    in_rotation: bool = True


class ReplicaPool:
    def __init__(self, model: str, urls: Sequence[str], *, eject_after_failures: int) -> None:
        self._model = model
        self._eject_after = eject_after_failures
        self.replicas = [Replica(url) for url in urls]
        self._observer: ReplicaObserver | None = None

    def observe(self, observer: ReplicaObserver) -> None:
        self._observer = observer
        for replica in self.replicas:
            observer.rotation(replica.url, in_rotation=replica.in_rotation)

    def order(self) -> list[Replica]:
        """The replicas in the order one request tries them (see the module's docstring)."""
        return sorted(self.replicas, key=lambda r: (not r.in_rotation, r.in_flight))

    def out_of_rotation(self) -> list[Replica]:
        return [replica for replica in self.replicas if not replica.in_rotation]

    def served(self, replica: Replica) -> None:
        """``replica`` sent a generation's first token."""
        if not replica.in_rotation:
            self.restore(replica, via="request")
        if self._observer is not None:
            self._observer.served(replica.url)

    def succeeded(self, replica: Replica) -> None:
        """``replica`` streamed a generation to its end."""
        replica.failures = 0

    def skipped(self, replica: Replica, reason: SkipReason, detail: str) -> None:
        """A request left ``replica`` before its first token for the next one."""
        _logger.warning("replica_skipped", model=self._model, url=replica.url, reason=reason, detail=detail)
        if self._observer is not None:
            self._observer.skipped(replica.url, reason)
        if reason != "status_429":
            self.failed(replica)

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.in_rotation and replica.failures >= self._eject_after:
            replica.in_rotation = False
            _logger.warning("replica_ejected", model=self._model, url=replica.url, failures=replica.failures)
            if self._observer is not None:
                self._observer.rotation(replica.url, in_rotation=False)

    def restore(self, replica: Replica, *, via: Literal["probe", "request"]) -> None:
        if replica.in_rotation:
            return
        replica.in_rotation = True
        replica.failures = 0
        _logger.info("replica_restored", model=self._model, url=replica.url, via=via)
        if self._observer is not None:
            self._observer.rotation(replica.url, in_rotation=True)
