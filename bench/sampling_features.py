"""What constrained sampling and log-probabilities cost the llama.cpp backend's decode speed.

The embedded model (SmolLM2-135M F16, the embedded default) decodes the same essay prompt in
each mode, rounds alternating between modes so that noise from other work on the machine falls
on all of them alike:

    plain        no constraint, no logprobs
    json         a JSON-schema constraint (an object holding one long string)
    logprobs=5   each token's logprob and its 5 most likely alternatives
    json+lp5     both
    echo         plain, plus the prompt's own logprobs (top 5): prefill time, reported apart

Decode tokens/s is the median over rounds of ``(n - n_first) / (t_last - t_first)``, where
``n_first`` tokens arrived with the first delta: prefill is left out, and shown apart as the time
to the first delta (the cache is cleared before each request, so every mode evaluates the whole
prompt). EOS is banned, so every mode decodes ``--max-tokens`` tokens.

    python -m bench.sampling_features [--rounds 5] [--max-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llguidance import LLMatcher

from backends.base import Constraint, GenerationRequest, SamplingParams
from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.registry import backend_config
from gateway.settings import ModelConfig, embedded_model

CONTEXT = 1024
ESSAY = "Write a long, detailed essay about the history of Paris, from Roman times to today, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 80}, "essay": {"type": "string", "minLength": 2000}},
    "required": ["title", "essay"],
    "additionalProperties": False,
}


def model_config(threads: int) -> ModelConfig:
    base = embedded_model()
    options = base.options | {"compute_format": "f16", "n_ctx": CONTEXT, "n_threads": threads}
    return ModelConfig(name="smollm2-f16", backend="llamacpp", path=base.path, template="jinja", options=options)


async def decode_rate(backend: LlamaCppBackend, request: GenerationRequest) -> tuple[float, float]:
    """(decode tokens/s, seconds to the first delta)."""
    started = time.perf_counter()
    times: list[float] = []
    counts: list[int] = []
    async for delta in backend.generate(request):
        times.append(time.perf_counter())
        counts.append(len(delta.token_ids))
    tokens = sum(counts)
    assert tokens == request.sampling.max_tokens, f"{tokens} tokens, expected {request.sampling.max_tokens}"
    return (tokens - counts[0]) / (times[-1] - times[0]), times[0] - started


async def run(rounds: int, max_tokens: int, threads: int) -> None:
    config = model_config(threads)
    with tempfile.TemporaryDirectory() as data_dir:
        backend = LlamaCppBackend(backend_config(config), weights_dir=Path(data_dir))
        await backend.start()
        try:
            llama = backend._all_slots[0].llama
            prompt = llama.tokenize(
                f"<|im_start|>user\n{ESSAY}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True
            )
            json_grammar = Constraint(LLMatcher.grammar_from_json_schema(SCHEMA), {"guided_json": SCHEMA})
            sampling = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
            modes: dict[str, dict[str, Any]] = {
                "plain": {},
                "json": {"constraint": json_grammar},
                "logprobs=5": {"logprobs": 5},
                "json+lp5": {"constraint": json_grammar, "logprobs": 5},
                "echo": {"prompt_logprobs": 5},
            }
            rates: dict[str, list[float]] = {mode: [] for mode in modes}
            firsts: dict[str, list[float]] = {mode: [] for mode in modes}
            # One constrained request first: it builds the grammar tokenizer (timed apart).
            started = time.perf_counter()
            await decode_rate(backend, GenerationRequest("warm", prompt, sampling, constraint=json_grammar))
            warm = time.perf_counter() - started
            for _ in range(rounds):
                for mode, fields in modes.items():
                    llama.reset()  # every mode evaluates the whole prompt: echo cannot reuse a cached prefix
                    rate, first = await decode_rate(backend, GenerationRequest(mode, prompt, sampling, **fields))
                    rates[mode].append(rate)
                    firsts[mode].append(first)
            sample = [t async for t in _sample_text(backend, prompt, json_grammar, max_tokens)]
        finally:
            await backend.stop()
    print(
        f"{platform.processor() or platform.machine()}, {threads} threads, {len(prompt)} prompt tokens, "
        f"{max_tokens} tokens decoded, median of {rounds} rounds"
    )
    print(f"first constrained request ({max_tokens} tokens, grammar tokenizer built on the way): {warm:.2f} s")
    plain = statistics.median(rates["plain"])
    print(f"{'mode':<12} {'decode tok/s':>12} {'vs plain':>9} {'first delta ms':>15}")
    for mode in modes:
        rate = statistics.median(rates[mode])
        first = statistics.median(firsts[mode]) * 1000
        print(f"{mode:<12} {rate:>12.1f} {rate / plain:>9.2f} {first:>15.1f}")
    print(f"json reply starts: {''.join(sample)[:80]!r}")


async def _sample_text(
    backend: LlamaCppBackend, prompt: list[int], grammar: Constraint, max_tokens: int
) -> AsyncIterator[str]:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    async for delta in backend.generate(GenerationRequest("sample", prompt, sampling, constraint=grammar)):
        yield delta.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.max_tokens, args.threads))


if __name__ == "__main__":
    main()
