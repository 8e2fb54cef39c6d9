"""Before and after: the latency two gateway trees add at c=1, measured in alternating rounds.

``bench.overhead`` compares the gateway with its upstream; this compares two versions of the
gateway with each other, in one run, so that a change's effect is not lost in the noise between
runs on a shared machine. The "before" gateway runs the code of another checkout (for example
``git worktree add /tmp/before HEAD~3``) through ``PYTHONPATH``; both use this checkout's
benchmark set-up (instant upstream, SQLite, a key with limits and a budget, usage recording on).

    python -m bench.overhead_ab --before /tmp/before [--rounds 5] [--seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

from bench.overhead import BODY, Target, _gateway, _models, _sqlite_url, upstream
from bench.wrk import run_wrk


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


async def measure(before: Path, rounds: int, seconds: float) -> None:
    async with AsyncExitStack() as stack:
        instant = await stack.enter_async_context(upstream(0))
        paced = await stack.enter_async_context(upstream(0))
        models = _models(instant, paced)
        with _python_path(before):
            old = await _gateway(stack, "before", _sqlite_url(stack), models)
        new = await _gateway(stack, "after", _sqlite_url(stack), models)
        direct = Target("direct", instant)
        for stream in (False, True):
            body = {**BODY, "stream": stream}
            p50: dict[str, list[float]] = {"direct": [], "before": [], "after": []}
            cpu: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(rounds):
                for target in (direct, old, new):
                    start = _cpu_seconds(target.pid) if target.pid else 0.0
                    result = await run_wrk(
                        target.base_url + "/v1/chat/completions",
                        body,
                        connections=1,
                        seconds=seconds,
                        api_key=target.api_key,
                    )
                    if result.non_2xx:
                        raise RuntimeError(f"{target.name} answered {result.non_2xx} non-2xx responses")
                    p50[target.name].append(result.p50_us / 1000)
                    if target.pid:
                        cpu[target.name].append(1e6 * (_cpu_seconds(target.pid) - start) / max(1, result.ok))
            base = statistics.median(p50["direct"])
            mode = "stream" if stream else "json"
            for name in ("before", "after"):
                rounds_ms = ", ".join(f"{value - d:.2f}" for value, d in zip(p50[name], p50["direct"], strict=True))
                added = statistics.median(p50[name]) - base
                per_request = statistics.median(cpu[name])
                print(
                    f"{mode:<6} c=1 {name:<6} p50 added {added:.2f} ms (rounds: {rounds_ms}); "
                    f"gateway CPU {per_request:.0f} us a request",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the gateway to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    asyncio.run(measure(args.before.resolve(), args.rounds, args.seconds))


if __name__ == "__main__":
    main()
