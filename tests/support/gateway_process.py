"""Gateways as operators run them, for the observability and probe tests.

Tests of what production sees (log output, SIGTERM, several workers) run ``llama-gateway serve``
as a child process with a YAML config, exactly as an operator would; the others use the in-process
``running_gateway``. Models are scripted backends whose tokens are counted with the Llama 2
tokenizer, so token counts and prices are real.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import ModelConfig
from tests.support import model_configs
from tests.support.live import free_port

MODEL = "scripted"
REPLY = "one two three four five six seven eight nine ten"
INPUT_PRICE = Decimal("0.65")
OUTPUT_PRICE = Decimal("2.75")
STARTUP_TIMEOUT_S = 90.0


def scripted_model(name: str = MODEL, *, max_concurrency: int = 8, **options: Any) -> ModelConfig:
    """A scripted model at the hosted Llama-2-70B-chat's prices, replying ``REPLY`` unless told otherwise."""
    return model_configs.scripted_model(
        name,
        max_concurrency=max_concurrency,
        input_price=INPUT_PRICE,
        output_price=OUTPUT_PRICE,
        **({"reply": REPLY} | options),
    )


def chat_request_body(content: str = "Hello", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}


def metric_samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class GatewayProcess:
    """``llama-gateway serve`` running as a child process, its output going to ``log_path``."""

    process: subprocess.Popen[bytes]
    base_url: str
    api_key: str
    log_path: Path
    db_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8")

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line of output, each parsed as JSON (the format fails the test otherwise)."""
        return [json.loads(line) for line in self.log_text().splitlines() if line.strip()]

    def request_lines(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line["event"] == "request"]

    def request_line(self, request_id: str, *, wait_s: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((line for line in self.request_lines() if line.get("request_id") == request_id), None)

        return wait_for(find, wait_s, f"no log line for request {request_id}")

    def usage_row(self, request_id: str) -> dict[str, Any] | None:
        with contextlib.closing(sqlite3.connect(self.db_path)) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM usage_records WHERE request_id = ?", (request_id,)).fetchone()
        return None if row is None else dict(row)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)


def wait_for[T](probe: Callable[[], T | None], timeout: float, failure: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure)
        time.sleep(0.05)


def console_script() -> list[str]:
    """The ``llama-gateway`` command of this environment."""
    script = Path(sys.executable).with_name("llama-gateway")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gateway.cli.main import main; main()"]


@contextlib.contextmanager
def gateway_process(
    directory: Path,
    *,
    models: list[ModelConfig] | None = None,
    workers: int = 1,
    port: int | None = None,
    api_key: str | None = None,
    **settings: Any,
) -> Iterator[GatewayProcess]:
    """Serve from a config file in ``directory`` until the block ends (SIGTERM, then SIGKILL).

    ``port`` and ``api_key`` (the first admin key) are chosen when not given; giving them lets a
    test restart a worker where its clients expect it."""
    port = port or free_port()
    db_path = directory / "gateway.db"
    api_key = api_key or "sk-test-" + secrets.token_urlsafe(24)
    settings = {"database_url": f"sqlite+aiosqlite:///{db_path}", "log_format": "json"} | settings
    config_path = write_config(directory / "config.yaml", port, models or [scripted_model()], **settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_GATEWAY_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["LLAMA_GATEWAY_INITIAL_ADMIN_KEY"] = api_key
    command = [*console_script(), "serve", "--config", str(config_path), "--workers", str(workers)]
    log_path = directory / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory)
    served = GatewayProcess(process, f"http://127.0.0.1:{port}", api_key, log_path, db_path)
    try:
        _wait_until_serving(served, workers)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_serving(served: GatewayProcess, workers: int) -> None:
    def started() -> bool:
        if served.process.poll() is not None:
            raise AssertionError(f"the gateway exited with {served.process.returncode}:\n{served.log_text()}")
        text = served.log_text()
        if text.count("Application startup complete.") < workers:
            return False
        try:
            return httpx.get(served.base_url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(started, STARTUP_TIMEOUT_S, "the gateway did not become ready")


def write_config(path: Path, port: int, models: list[ModelConfig], **settings: Any) -> Path:
    """A gateway config file serving ``models`` on loopback ``port``, as an operator writes one."""
    config = {"host": "127.0.0.1", "port": port, **settings, "models": msgspec.to_builtins(models)}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
