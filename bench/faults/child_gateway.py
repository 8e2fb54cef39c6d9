"""``llama-gateway serve`` as a child process, started from a YAML config as an operator starts it,
for the scenarios that must be able to kill the gateway outright (SIGKILL) and start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.faults.harness import free_port
from gateway.settings import ModelConfig

STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


@dataclass
class ChildGateway:
    process: asyncio.subprocess.Process
    base_url: str
    log_path: Path

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no flush, nothing the process could still do."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM and wait for the graceful exit (SIGKILL after ``STOP_TIMEOUT_S``)."""
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self.process.wait()
        except TimeoutError:
            await self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def counter(self, name: str) -> float:
        """A label-less counter's value from ``/metrics``."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            response = await client.get("/metrics")
        response.raise_for_status()
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        raise LookupError(f"/metrics has no {name}")


@contextlib.asynccontextmanager
async def child_gateway(
    directory: Path,
    models: list[ModelConfig],
    admin_key: str,
    *,
    workers: int = 1,
    command_prefix: Sequence[str] = (),
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    **settings: Any,
) -> AsyncIterator[ChildGateway]:
    """Serve until the block ends (SIGTERM then), from ``directory/gateway.yaml``; output to ``gateway.log``.

    ``command_prefix`` runs the gateway under another program (a profiler)."""
    port = free_port()
    config = {"host": "127.0.0.1", "port": port, **settings, "models": msgspec.to_builtins(models)}
    config_path = directory / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {name: value for name, value in os.environ.items() if not name.startswith("LLAMA_GATEWAY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["LLAMA_GATEWAY_INITIAL_ADMIN_KEY"] = admin_key
    log_path = directory / "gateway.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *command_prefix,
            *_console_script(),
            "serve",
            "--config",
            str(config_path),
            "--workers",
            str(workers),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=directory,
        )
    gateway = ChildGateway(process, f"http://127.0.0.1:{port}", log_path)
    try:
        await _wait_until_ready(gateway, startup_timeout_s)
        yield gateway
    finally:
        await gateway.stop()


async def _wait_until_ready(gateway: ChildGateway, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s), httpx.AsyncClient(base_url=gateway.base_url, timeout=2) as client:
        while True:
            if gateway.process.returncode is not None:
                raise RuntimeError(f"the gateway exited with {gateway.process.returncode}:\n{gateway.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.1)


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("llama-gateway")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gateway.cli.main import main; main()"]
