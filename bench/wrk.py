"""wrk as the load generator: a C process of its own, so the load costs the machine little.

``run_wrk`` posts one JSON body over ``connections`` keep-alive connections for ``seconds`` and
returns what wrk counted: requests answered, non-2xx answers, socket errors and latency
percentiles (microseconds). A Lua ``done`` hook prints them as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_MARK = "WRK-RESULT "

_SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"connect_errors":%%d,"read_errors":%%d,' ..
    '"write_errors":%%d,"non_2xx":%%d,"timeouts":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,' ..
    '"max_us":%%d,"mean_us":%%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


class WrkMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests: int
    """Responses wrk read whole (2xx or not)."""
    duration_us: int
    connect_errors: int
    read_errors: int
    write_errors: int
    non_2xx: int
    timeouts: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    mean_us: float

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def per_second(self) -> float:
        return self.ok / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "per_second": round(self.per_second, 1)}


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise WrkMissing("wrk is not installed (Debian: apt-get install wrk); `make bench-overhead` installs it")
    return path


async def run_wrk(
    url: str, body: dict[str, Any], *, connections: int, seconds: float, api_key: str | None = None, threads: int = 1
) -> WrkResult:
    auth = f'wrk.headers["Authorization"] = "Bearer {api_key}"' if api_key else ""
    # A Lua long string holds the JSON as it is, quotes and all.
    script = _SCRIPT % {"body": "[==[" + json.dumps(body) + "]==]", "auth": auth, "mark": RESULT_MARK}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        process = await asyncio.create_subprocess_exec(
            wrk_path(),
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            file.name,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
    finally:
        await asyncio.to_thread(Path(file.name).unlink, missing_ok=True)
    text = output.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith(RESULT_MARK):
            return WrkResult(**json.loads(line[len(RESULT_MARK) :]))
    raise RuntimeError(f"wrk printed no result (exit {process.returncode}):\n{text[-2000:]}")
