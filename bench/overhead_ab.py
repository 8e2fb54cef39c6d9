"""Before and after: what two gateway trees cost a request, measured side by side in alternating rounds.

``bench.overhead`` compares the gateway with its upstream; this compares two versions of the
gateway with each other, in one run, so that a change's effect is not lost in the noise between
runs on a shared machine. The "before" gateway runs the code of another checkout (for example
``git worktree add /tmp/before HEAD~3``) through ``PYTHONPATH``; both use this checkout's
benchmark set-up (instant upstream, SQLite, a key with limits and a budget, usage recording on).

Each round runs wrk at c=1 against the upstream direct and both gateways (the p50 each adds, and
the gateway's CPU time per request), then at c=16 against both gateways (requests/s); rounds
alternate the order. It prints each side's medians and the paired differences, round by round.

    python -m bench.overhead_ab --before /tmp/before [--rounds 5] [--seconds 4] [--busy 16] [--postgres]

With ``--postgres`` both gateways record usage in PostgreSQL (a scratch database each) instead of
SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.faults.harness import ScratchDatabases
from bench.overhead import BODY, POSTGRES_URL, Target, _gateway, _models, _sqlite_url, upstream
from bench.wrk import run_wrk
from gateway.db import upgrade_database


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def _python_path(tree: Path | None) -> Iterator[None]:
    """Child processes started inside import ``gateway`` and ``backends`` from ``tree``."""
    previous = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


@dataclass
class _Rounds:
    """One mode's rounds: p50 (ms), req/s and gateway CPU per request (us), by target name."""

    p50: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "before": [], "after": []})
    rate: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "before": [], "after": []})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {"before": [], "after": []})

    def paired(self, values: dict[str, list[float]]) -> list[float]:
        """after - before, round by round (the two ran next to each other)."""
        return [a - b for b, a in zip(values["before"], values["after"], strict=True)]


async def _round(
    targets: list[Target], body: dict[str, object], connections: int, seconds: float, into: _Rounds
) -> None:
    for target in targets:
        start = _cpu_seconds(target.pid) if target.pid else 0.0
        result = await run_wrk(
            target.base_url + "/v1/chat/completions",
            body,
            connections=connections,
            seconds=seconds,
            api_key=target.api_key,
        )
        if result.non_2xx:
            raise RuntimeError(f"{target.name} answered {result.non_2xx} non-2xx responses")
        into.p50[target.name].append(result.p50_us / 1000)
        into.rate[target.name].append(result.requests / (result.duration_us / 1e6))
        if target.pid:
            into.cpu[target.name].append(1e6 * (_cpu_seconds(target.pid) - start) / max(1, result.ok))


async def _database_urls(stack: AsyncExitStack, postgres: bool) -> tuple[str, str]:
    """One database per gateway: SQLite files, or scratch PostgreSQL databases migrated to head."""
    if not postgres:
        return _sqlite_url(stack), _sqlite_url(stack)
    databases = ScratchDatabases(POSTGRES_URL)
    stack.push_async_callback(databases.drop_all)
    urls = []
    for name in ("bench_ab_before", "bench_ab_after"):
        url = databases.url(await databases.create(name))
        await upgrade_database(url)
        urls.append(url)
    return urls[0], urls[1]


async def measure(before: Path, rounds: int, seconds: float, busy_connections: int, postgres: bool) -> None:
    async with AsyncExitStack() as stack:
        instant = await stack.enter_async_context(upstream(0))
        paced = await stack.enter_async_context(upstream(0))
        models = _models(instant, paced)
        old_url, new_url = await _database_urls(stack, postgres)
        with _python_path(before):
            old = await _gateway(stack, "before", old_url, models)
        new = await _gateway(stack, "after", new_url, models)
        direct = Target("direct", instant)
        for stream in (False, True):
            body = {**BODY, "stream": stream}
            mode = "stream" if stream else "json"
            alone, busy = _Rounds(), _Rounds()
            for index in range(rounds):
                # Each round in the other order, so a drift of the machine's speed favours neither.
                order = [direct, old, new] if index % 2 == 0 else [new, old, direct]
                await _round(order, body, 1, seconds, alone)
                await _round([target for target in order if target.pid], body, busy_connections, seconds, busy)
            base = statistics.median(alone.p50["direct"])
            for name in ("before", "after"):
                rounds_ms = ", ".join(f"{value - base:.2f}" for value in alone.p50[name])
                print(
                    f"{mode:<6} c=1 {name:<6} p50 added {statistics.median(alone.p50[name]) - base:.2f} ms "
                    f"(rounds: {rounds_ms}); gateway CPU {statistics.median(alone.cpu[name]):.0f} us a request; "
                    f"c={busy_connections} {statistics.median(busy.rate[name]):.0f} req/s",
                    flush=True,
                )
            latency = alone.paired(alone.p50)
            faster = sum(1 for difference in latency if difference < 0)
            ratios = [a / b for b, a in zip(busy.rate["before"], busy.rate["after"], strict=True)]
            print(
                f"{mode:<6} after - before, paired by round: c=1 p50 {statistics.median(latency):+.3f} ms "
                f"(after faster in {faster} of {rounds}), CPU {statistics.median(alone.paired(alone.cpu)):+.0f} us "
                f"a request; c={busy_connections} req/s x{statistics.median(ratios):.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the gateway to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--busy", type=int, default=16, help="connections of the throughput runs")
    parser.add_argument("--postgres", action="store_true", help="usage in PostgreSQL instead of SQLite")
    args = parser.parse_args()
    asyncio.run(measure(args.before.resolve(), args.rounds, args.seconds, args.busy, args.postgres))


if __name__ == "__main__":
    main()
