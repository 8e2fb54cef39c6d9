"""Instructions the gateway executes per request, counted by callgrind.

Wall-clock comparisons on a shared machine need many rounds to see a change of a few percent in
the gateway's own cost (``bench.overhead_ab``). An instruction count does not move with the
machine's speed: the same tree gives the same count to within about 2 % from run to run, so a
change that removes a few percent of the work shows in one run.

Each tree's gateway (this checkout, and with ``--before`` another one through ``PYTHONPATH``)
runs under ``valgrind --tool=callgrind`` with counting off, in front of the instant upstream, with
the set-up of ``bench.overhead`` (SQLite, a key with limits and a budget, usage recording on,
info logs to a file). After a warm-up, counting is switched on for an idle period, whose rate
(the periodic tasks: the webhook sender's poll, the server's ticks) is subtracted, and for
``--requests`` chat completions sent one after another.

What it counts: user-space instructions of every thread of the gateway. What it leaves out:
time in the kernel and waiting (the usage row's fsync, the sockets), which ``bench.overhead``
measures. Needs ``valgrind`` (Debian's package) on the PATH.

    python -m bench.instructions [--requests 200] [--before /tmp/before] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.faults.child_gateway import ChildGateway, child_gateway
from bench.overhead import ADMIN_KEY, BODY, _models, _user_key, upstream
from bench.overhead_ab import _python_path

WARM_UP_REQUESTS = 30
IDLE_S = 10.0
STARTUP_UNDER_VALGRIND_S = 600.0


@dataclass
class Count:
    per_request: float
    """Instructions per request, the idle rate subtracted."""
    raw_per_request: float
    idle_per_s: float
    seconds: float


class Callgrind:
    """Counting in a process started under callgrind, read by ``callgrind_control``."""

    def __init__(self, out_file: Path) -> None:
        self.out_file = out_file

    async def _control(self, pid: int, *args: str) -> None:
        process = await asyncio.create_subprocess_exec(
            "callgrind_control",
            *args,
            str(pid),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {output.decode(errors='replace')}")

    async def switch(self, pid: int, on: bool) -> None:
        await self._control(pid, "--instr=" + ("on" if on else "off"))

    async def dump(self, pid: int) -> int:
        """Instructions counted since the last dump (dumping starts the count again)."""
        await self._control(pid, "--dump")
        total = 0
        for part in self.out_file.parent.glob(self.out_file.name + ".*"):
            for line in part.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    total += int(line.split()[1])
                    break
            part.unlink()
        return total


async def _requests(client: httpx.AsyncClient, key: str, body: dict[str, object], count: int) -> None:
    for _ in range(count):
        response = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        response.raise_for_status()


async def count_tree(tree: Path | None, requests: int, stream: bool) -> Count:
    async with AsyncExitStack() as stack:
        instant = await stack.enter_async_context(upstream(0))
        models = _models(instant, instant)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instructions-")))
        callgrind = Callgrind(directory / "callgrind.out")
        prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={callgrind.out_file}"]
        with _python_path(tree):
            gateway: ChildGateway = await stack.enter_async_context(
                child_gateway(
                    directory,
                    models,
                    ADMIN_KEY,
                    database_url=f"sqlite+aiosqlite:///{directory / 'usage.db'}",
                    data_dir=str(directory / "data"),
                    command_prefix=[*prefix, sys.executable],
                    startup_timeout_s=STARTUP_UNDER_VALGRIND_S,
                )
            )
        pid = gateway.process.pid
        key = await _user_key(gateway)
        body = {**BODY, "stream": stream}
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=120) as client:
            await _requests(client, key, body, WARM_UP_REQUESTS)
            await callgrind.switch(pid, True)
            await callgrind.dump(pid)
            started = time.monotonic()
            await asyncio.sleep(IDLE_S)
            idle = await callgrind.dump(pid)
            idle_per_s = idle / (time.monotonic() - started)
            started = time.monotonic()
            await _requests(client, key, body, requests)
            busy = await callgrind.dump(pid)
            seconds = time.monotonic() - started
            await callgrind.switch(pid, False)
        return Count((busy - idle_per_s * seconds) / requests, busy / requests, idle_per_s, seconds)


def _line(name: str, count: Count) -> str:
    return (
        f"{name:<7} {count.per_request / 1000:8.0f} k instructions a request "
        f"(counted {count.raw_per_request / 1000:.0f} k, less {count.idle_per_s / 1000:.0f} k/s idle "
        f"over {count.seconds:.0f} s)"
    )


async def measure(before: Path | None, requests: int, stream: bool) -> None:
    mode = "streamed" if stream else "non-streamed"
    print(f"{requests} {mode} chat completions one after another, each tree under callgrind", flush=True)
    after = await count_tree(None, requests, stream)
    print(_line("after" if before else "gateway", after), flush=True)
    if before is not None:
        earlier = await count_tree(before, requests, stream)
        print(_line("before", earlier), flush=True)
        change = after.per_request / earlier.per_request - 1
        print(f"after / before: {change:+.1%}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--before", type=Path, help="checkout of the gateway to compare with")
    parser.add_argument("--stream", action="store_true", help="streamed chat completions")
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{' and '.join(missing)} not found: install valgrind (apt-get install valgrind)")
    asyncio.run(measure(args.before, args.requests, args.stream))


if __name__ == "__main__":
    main()
