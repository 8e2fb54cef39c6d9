"""Run every fault scenario and print one row each: requests sent, served, failed, usage rows found.

    python -m bench.faults [--scale N] [--json FILE] [--only NAME ...]

PostgreSQL and Redis are the machine's (``LLAMA_GATEWAY_BENCH_POSTGRES_URL``, default the ``test``
database on 127.0.0.1:5432; ``LLAMA_GATEWAY_BENCH_REDIS_URL``, default 127.0.0.1:6379). Scenarios
create scratch databases and keys of their own and never stop either service: outages are cuts of a
TCP proxy in front of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.faults import budget_race, client_disconnects, database_outage, hostile_inputs, redis_outage
from bench.faults.report import ScenarioResult, as_json, table

POSTGRES_URL = os.environ.get("LLAMA_GATEWAY_BENCH_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LLAMA_GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

Scenario = Callable[[int], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "hostile-inputs": hostile_inputs.run,
    "database-outage": lambda scale: database_outage.run(scale, postgres_url=POSTGRES_URL),
    "redis-outage": lambda scale: redis_outage.run(scale, redis_url=REDIS_URL),
    "redis-hang": lambda scale: redis_outage.run(scale, redis_url=REDIS_URL, hang=True),
    "budget-race-sqlite": lambda scale: budget_race.run(scale),
    "budget-race-postgres-redis": lambda scale: budget_race.run(
        scale, postgres_url=POSTGRES_URL, redis_url=REDIS_URL, replicas=2
    ),
    "client-disconnects": lambda scale: client_disconnects.run(scale),
}


async def _run(names: list[str], scale: int) -> list[ScenarioResult]:
    results = []
    for name in names:
        started = time.monotonic()
        result = await SCENARIOS[name](scale)
        result.notes.append(f"took {time.monotonic() - started:.1f} s")
        results.append(result)
        print(f"{name}: {'ok' if result.ok else 'NOT OK'}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="multiplies each scenario's load")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args()
    results = asyncio.run(_run(args.only or list(SCENARIOS), args.scale))
    print(table(results))
    if args.json is not None:
        args.json.write_text(as_json(results), encoding="utf-8")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
