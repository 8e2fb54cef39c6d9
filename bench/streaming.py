"""Streaming speed through the gateway against llama-cpp-python called directly.

Both sides stream the same completion of the bundled SmolLM2 in the F16 form the embedded default
serves: the same prompt token ids,
greedy decoding, the same number of new tokens, the same ``n_threads``.

- direct: ``Llama.create_completion(prompt_ids, stream=True, temperature=0)`` in this process;
- gateway: ``llama-gateway serve`` in a subprocess (temporary config and SQLite database), read
  with the OpenAI SDK streaming ``/v1/completions`` with the token-id prompt and ``min_tokens``.

Runs alternate (direct, gateway, gateway, direct, ...), one at a time, so the two engines never
compute at once. Metrics follow vLLM's benchmark definitions: TTFT from sending the request to
the first content token; ITL the gaps between consecutive tokens; decode throughput
``(n - 1) / (t_last - t_first)``.

    python -m bench.streaming [--runs 6] [--max-tokens 128] [--threads N]

``--threads`` defaults to half the CPUs, as llama-cpp-python (and so the zero-config gateway) does.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import yaml

from backends.llamacpp.weights import ensure_converted
from gateway.serving.tokenizers import GGUFTokenizer
from gateway.settings import EMBEDDED_GGUF_SHA256, EMBEDDED_MODEL_NAME, Settings, embedded_model_path

PROMPT = "Write a long, detailed essay about the history of Paris, from Roman times to today."
CONTEXT = 2048
N_BATCH = 512
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Run:
    """Arrival times of one streamed completion, in seconds after its request was sent."""

    text: str
    token_times: list[float]

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        return self.token_times[0]

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.tokens - 1) / (self.token_times[-1] - self.token_times[0])


def chat_prompt_ids(tokenizer: GGUFTokenizer, text: str) -> list[int]:
    """SmolLM2's ChatML around one user turn, as ids (the model's own template, rendered by hand)."""
    return tokenizer.encode_with_special(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def timed_stream(chunks: Callable[[], Iterator[str]]) -> Run:
    """Consume a stream of per-token texts, stamping each non-empty one."""
    sent = time.perf_counter()
    times: list[float] = []
    texts: list[str] = []
    for text in chunks():
        if text:
            times.append(time.perf_counter() - sent)
            texts.append(text)
    return Run("".join(texts), times)


class Direct:
    """llama-cpp-python in this process."""

    def __init__(self, model: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llama = Llama(model_path=str(model), n_ctx=CONTEXT, n_batch=N_BATCH, n_threads=threads, verbose=False)

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Run:
        def chunks() -> Iterator[str]:
            for chunk in self.llama.create_completion(
                prompt_ids,
                max_tokens=max_tokens,
                temperature=0,
                repeat_penalty=1.0,
                stream=True,
            ):
                yield chunk["choices"][0]["text"]

        return timed_stream(chunks)

    def close(self) -> None:
        self.llama.close()


class Gateway:
    """``llama-gateway serve`` in a subprocess, read through the OpenAI SDK."""

    def __init__(self, model: Path, threads: int, workdir: Path) -> None:
        port = _free_port()
        key = "sk-bench-" + secrets.token_urlsafe(16)
        config = {
            "host": "127.0.0.1",
            "port": port,
            "database_url": f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
            "log_level": "warning",
            "models": [
                {
                    "name": EMBEDDED_MODEL_NAME,
                    "backend": "llamacpp",
                    "path": str(model),
                    "template": "jinja",
                    "context_length": CONTEXT,
                    "options": {"n_ctx": CONTEXT, "n_batch": N_BATCH, "n_threads": threads},
                }
            ],
        }
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "gateway.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_GATEWAY_")}
        env["LLAMA_GATEWAY_INITIAL_ADMIN_KEY"] = key
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [_gateway_command(), "serve", "--config", str(config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base_url = f"http://127.0.0.1:{port}"
        self._wait_until_ready(base_url)
        self.client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=300)

    def _wait_until_ready(self, base_url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited; see {self.log_path}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(base_url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the gateway did not get ready in {STARTUP_TIMEOUT_S} s; see {self.log_path}")

    def stream(self, prompt_ids: list[int], max_tokens: int) -> Run:
        def chunks() -> Iterator[str]:
            with self.client.completions.create(
                model=EMBEDDED_MODEL_NAME,
                prompt=prompt_ids,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"min_tokens": max_tokens},
            ) as stream:
                for chunk in stream:
                    if chunk.choices:
                        yield chunk.choices[0].text

        return timed_stream(chunks)

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _gateway_command() -> str:
    beside = Path(sys.executable).with_name("llama-gateway")
    found = str(beside) if beside.exists() else shutil.which("llama-gateway")
    if found is None:
        raise RuntimeError("the llama-gateway command is not installed (pip install -e .)")
    return found


@dataclass(frozen=True)
class Summary:
    tokens_per_s: float
    ttft_ms: float
    itl_mean_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_ms: float

    @classmethod
    def of(cls, runs: list[Run]) -> Summary:
        itls = np.array([gap for run in runs for gap in run.itls]) * 1000
        return cls(
            tokens_per_s=float(np.median([run.decode_tokens_per_s for run in runs])),
            ttft_ms=float(np.median([run.ttft for run in runs]) * 1000),
            itl_mean_ms=float(itls.mean()),
            itl_p50_ms=float(np.percentile(itls, 50)),
            itl_p99_ms=float(np.percentile(itls, 99)),
            tpot_ms=float(np.median([1000 / run.decode_tokens_per_s for run in runs])),
        )


def _row(name: str, direct: float, gateway: float, unit: str, ratio: str) -> str:
    return f"  {name:<24}{direct:>12.2f}{gateway:>12.2f}  {unit:<6}{ratio:>14}"


def report(direct: list[Run], gateway: list[Run]) -> None:
    d, g = Summary.of(direct), Summary.of(gateway)
    print()
    print("Results (medians over runs; ITL pooled over every token gap of every run)")
    print(f"  {'':<24}{'direct':>12}{'gateway':>12}  {'':<6}{'gateway/direct':>14}")
    print(_row("decode throughput", d.tokens_per_s, g.tokens_per_s, "tok/s", f"{g.tokens_per_s / d.tokens_per_s:.3f}"))
    print(_row("TPOT", d.tpot_ms, g.tpot_ms, "ms", f"{g.tpot_ms / d.tpot_ms:.3f}"))
    print(_row("TTFT", d.ttft_ms, g.ttft_ms, "ms", f"{g.ttft_ms / d.ttft_ms:.3f}"))
    print(_row("ITL mean", d.itl_mean_ms, g.itl_mean_ms, "ms", f"{g.itl_mean_ms / d.itl_mean_ms:.3f}"))
    print(_row("ITL p50", d.itl_p50_ms, g.itl_p50_ms, "ms", f"{g.itl_p50_ms / d.itl_p50_ms:.3f}"))
    print(_row("ITL p99", d.itl_p99_ms, g.itl_p99_ms, "ms", f"{g.itl_p99_ms / d.itl_p99_ms:.3f}"))
    print()
    print(f"  throughput ratio gateway/direct: {g.tokens_per_s / d.tokens_per_s:.3f}  (target >= 0.95)")
    print(f"  added TTFT: {g.ttft_ms - d.ttft_ms:+.2f} ms  (target < 5 ms)")
    print()
    print("Per run (tok/s, TTFT ms):")
    for index, (a, b) in enumerate(zip(direct, gateway, strict=True)):
        print(
            f"  run {index + 1}: direct {a.decode_tokens_per_s:6.1f} tok/s {a.ttft * 1000:6.1f} ms"
            f"   gateway {b.decode_tokens_per_s:6.1f} tok/s {b.ttft * 1000:6.1f} ms"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=6, help="measured runs per side (after one warm-up each)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per completion")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="llama.cpp n_threads on both sides (default: half the CPUs, llama-cpp-python's own default)",
    )
    args = parser.parse_args(argv)

    # The weights the embedded default serves: the bundled file converted to F16 (cached after the first run).
    model = ensure_converted(
        embedded_model_path(), "f16", Settings().weights_dir(), expected_sha256=EMBEDDED_GGUF_SHA256
    ).path
    prompt_ids = chat_prompt_ids(GGUFTokenizer.from_file(model), PROMPT)
    cpus = os.cpu_count()
    print("llama-gateway streaming benchmark: direct llama-cpp-python vs. the gateway")
    print(f"  model        {model.name}")
    print(f"  prompt       {len(prompt_ids)} tokens (same ids on both sides), greedy, {args.max_tokens} new tokens")
    print(f"  n_threads    {args.threads} on both sides; {cpus} CPUs; n_ctx {CONTEXT}, n_batch {N_BATCH}")
    print(f"  runs         {args.runs} per side after one warm-up each, alternating, never concurrent")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) before start")
    sys.stdout.flush()

    direct_runs: list[Run] = []
    gateway_runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="llama-gateway-bench-") as workdir:
        gateway = Gateway(model, args.threads, Path(workdir))
        direct = Direct(model, args.threads)
        try:
            sides: dict[str, Any] = {"direct": (direct, direct_runs), "gateway": (gateway, gateway_runs)}
            for name, (side, _) in sides.items():
                warm = side.stream(prompt_ids, args.max_tokens)
                print(f"  warm-up {name}: {warm.tokens} tokens, {warm.decode_tokens_per_s:.1f} tok/s")
            for index in range(args.runs):
                # Alternate who goes first, so slow drifts in machine load hit both sides alike.
                order = ("direct", "gateway") if index % 2 == 0 else ("gateway", "direct")
                for name in order:
                    side, runs = sides[name]
                    runs.append(side.stream(prompt_ids, args.max_tokens))
        finally:
            direct.close()
            gateway.close()

    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) after the runs")
    counts = {run.tokens for run in direct_runs + gateway_runs}
    same_text = {run.text for run in direct_runs + gateway_runs}
    print(f"  tokens per completion: {sorted(counts)}; identical text on both sides: {len(same_text) == 1}")
    if counts != {args.max_tokens}:
        print("  WARNING: a side streamed a different number of tokens; the comparison is not like for like")
    report(direct_runs, gateway_runs)
    print()
    print(
        "Note on CPU contention: both sides share this machine's CPUs with whatever else runs on it;\n"
        "llama.cpp decode is CPU-bound, so other load (see the load averages) slows both sides and adds\n"
        "noise, mostly to ITL p99 and TTFT; alternating runs spreads it evenly. Direct, the per-token\n"
        "Python work runs between decode steps in one thread; through the gateway, the event loop's\n"
        "HTTP/SSE work and this process's SDK parsing of each chunk run while the next token decodes.\n"
        "When n_threads equals the number of free cores, that work preempts llama.cpp's threads and\n"
        "costs the gateway side throughput that a core to spare would not. Both engines reuse the\n"
        "cached prompt after the warm-up, so TTFT is one prompt token's evaluation plus the first\n"
        "decode step, plus, for the gateway, the HTTP round trip and the request's path (authentication,\n"
        "limits, queue, handing the request to the engine's thread)."
    )


if __name__ == "__main__":
    main()
