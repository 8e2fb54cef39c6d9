"""Decode speed of the embedded model in each compute format, side by side in one run.

The embedded default serves the shipped SmolLM2-135M-Instruct Q4_1 weights converted to F16,
because llama.cpp's quantized kernels change this small model's greedy answers from one x86-64 CPU
to the next. This benchmark prices that choice: each format is loaded through the gateway's own
llama.cpp backend (conversions cached in a temporary data directory), then rounds alternate between
formats so that noise from other work on the machine falls on all of them alike.

For each format it prints the file size, the first conversion's time, decode tokens/s (median over
rounds of ``(n - 1) / (t_last - t_first)`` for ``--max-tokens`` tokens with EOS banned), the ratio to
the stored Q4_1 file, and the greedy answer to "What is the capital of France?" on this machine.

    python -m bench.compute_formats [--rounds 5] [--max-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from backends.base import GenerationRequest, SamplingParams
from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.prompts import Message
from gateway.serving.registry import backend_config, build_registry
from gateway.settings import ModelConfig, embedded_model

FORMATS = ("stored", "q8_0", "f16", "bf16", "f32")
CONTEXT = 1024
ESSAY = "Write a long, detailed essay about the history of Paris, from Roman times to today."
QUESTION = "What is the capital of France?"


def model_config(fmt: str, threads: int) -> ModelConfig:
    base = embedded_model()
    options = base.options | {"compute_format": fmt, "n_ctx": CONTEXT, "n_threads": threads}
    return ModelConfig(name=f"smollm2-{fmt}", backend="llamacpp", path=base.path, template="jinja", options=options)


def chat_ids(question: str) -> list[int]:
    """The prompt the embedded default builds for one question (its default system prompt included)."""
    config = embedded_model()
    return build_registry([config]).get(config.name).chat_prompt_ids([Message("user", question)])


async def decode_rate(backend: LlamaCppBackend, prompt: list[int], max_tokens: int) -> float:
    sampling = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    times: list[float] = []
    tokens = 0
    async for delta in backend.generate(GenerationRequest("bench", prompt, sampling)):
        times.append(time.perf_counter())
        tokens += len(delta.token_ids)
    assert tokens == max_tokens, f"{tokens} tokens, expected {max_tokens}"
    return (len(times) - 1) / (times[-1] - times[0])


async def answer(backend: LlamaCppBackend) -> str:
    sampling = SamplingParams(max_tokens=24, temperature=0)
    parts = [d.text async for d in backend.generate(GenerationRequest("bench", chat_ids(QUESTION), sampling))]
    return "".join(parts)


async def run(rounds: int, max_tokens: int, threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-gateway-formats-") as data:
        backends: dict[str, LlamaCppBackend] = {}
        info: dict[str, dict[str, Any]] = {}
        for fmt in FORMATS:
            backend = LlamaCppBackend(backend_config(model_config(fmt, threads)), weights_dir=Path(data))
            started = time.perf_counter()
            path = await asyncio.to_thread(backend.prepare_weights)
            prepared = time.perf_counter() - started
            await backend.start()
            backends[fmt] = backend
            info[fmt] = {"size_mb": path.stat().st_size / 1e6, "prepare_s": prepared, "rates": []}
        try:
            prompt = chat_ids(ESSAY)
            for fmt in FORMATS:  # warm-up: caches, first-touch page faults
                await decode_rate(backends[fmt], prompt, 16)
            for index in range(rounds):
                order = FORMATS if index % 2 == 0 else tuple(reversed(FORMATS))
                for fmt in order:
                    info[fmt]["rates"].append(await decode_rate(backends[fmt], prompt, max_tokens))
            for fmt in FORMATS:
                info[fmt]["answer"] = await answer(backends[fmt])
        finally:
            for backend in backends.values():
                await backend.stop()
    stored = statistics.median(info["stored"]["rates"])
    print(f"embedded model decode by compute format: {rounds} rounds x {max_tokens} tokens, n_threads {threads}")
    print(f"  CPU: {cpu_name()}; {os.cpu_count()} CPUs; {platform.machine()}")
    columns = f"{'file MB':>8} {'convert s':>10} {'tok/s':>8} {'min':>7} {'max':>7} {'vs Q4_1':>8}"
    print(f"  {'format':<8} {columns}  answer")
    for fmt in FORMATS:
        rates = info[fmt]["rates"]
        median = statistics.median(rates)
        label = "q4_1" if fmt == "stored" else fmt
        convert = "-" if fmt == "stored" else f"{info[fmt]['prepare_s']:.1f}"
        print(
            f"  {label:<8} {info[fmt]['size_mb']:>8.0f} {convert:>10} {median:>8.1f} {min(rates):>7.1f}"
            f" {max(rates):>7.1f} {median / stored:>8.3f}  {info[fmt]['answer'][:60]!r}"
        )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds, args.max_tokens, args.threads))


if __name__ == "__main__":
    main()
