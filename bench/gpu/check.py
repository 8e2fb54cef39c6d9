"""Measure the exllamav2 backend on a GPU and write OUT/gpu-report.json plus a one-screen summary.

Run by run_check.sh once the wheels are installed, the CUDA extension is built and the random
Llama-2-7B-shaped model is written. Steps, each recorded whatever the others do:

1. raw_exllamav2    the dynamic generator alone: decode and prompt tokens/s
2. gateway_stream   the same request through a live gateway and the OpenAI SDK: tokens/s, TTFT,
                    inter-token latency, and the ratio to (1)
3. hf_transformers  Hugging Face ``generate`` on the same weights
4. bandwidth        decode tokens/s as a fraction of the memory-bandwidth limit
5. conformance      chat (plain and streamed), stop sequences, cancellation, concurrent requests,
                    a JSON schema, a forced tool call and logprobs;
                    paged batching reported as unavailable when flash-attn is missing

Decode rates count the tokens after the first over the time from the first to the last, measured
where the tokens arrive (the generator's results, or the client's stream), so (1) and (2) compare.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 512
NEW_TOKENS = 256
REPEATS = 3
MAX_SEQ_LEN = 4096
MODEL_NAME = "llama-2-7b-random"
PORT = 8011
EOS_ID = 2
# Nominal memory bandwidth, bytes/s, by a substring of torch's device name.
NOMINAL_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12}
WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "mountain",
    "garden",
    "window",
    "music",
    "letter",
    "paper",
    "table",
    "history",
    "science",
    "market",
    "answer",
    "question",
    "reason",
    "story",
    "night",
    "morning",
    "water",
    "money",
    "family",
    "friend",
    "city",
]

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:5.0f}s] {message}", flush=True)


class Check:
    """Runs steps under one deadline and keeps the report on disk after each of them."""

    def __init__(self, out: Path, deadline: float, report: dict[str, Any]) -> None:
        self.out, self.deadline, self.report = out, deadline, report
        self.report.setdefault("steps", {})

    def left(self) -> float:
        return self.deadline - time.time()

    def step(self, name: str, needs_s: float, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if self.left() < needs_s:
            reason = f"out of time: needs about {needs_s:.0f} s, {max(self.left(), 0):.0f} s of the budget left"
            self.report["steps"][name] = {"status": "skipped", "reason": reason}
            log(f"{name}: skipped ({reason})")
            self.save()
            return None
        log(f"{name}: start")
        started = time.monotonic()
        try:
            result = {"status": "ok", **run()}
        except Exception as exc:
            result = {
                "status": "error",
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
            log(f"{name}: ERROR {type(exc).__name__}: {str(exc)[:300]}")
        result["seconds"] = round(time.monotonic() - started, 1)
        self.report["steps"][name] = result
        self.save()
        log(f"{name}: {result['status']} in {result['seconds']} s")
        return result if result["status"] == "ok" else None

    def save(self) -> None:
        path = self.out / "gpu-report.json"
        path.write_text(json.dumps(self.report, indent=2, default=str) + "\n", encoding="utf-8")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")


def random_prompt_ids(rng: random.Random, length: int) -> list[int]:
    # BOS, then ordinary vocabulary (not byte or control tokens).
    return [1] + [rng.randrange(300, 31000) for _ in range(length - 1)]


# Environment and bandwidth


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": round(props.total_memory / 1024**3, 1),
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "model_dir": str(args.model_dir),
        "model_files_gib": round(sum(p.stat().st_size for p in args.model_dir.glob("*.safetensors")) / 1024**3, 2),
    }
    import exllamav2
    import exllamav2.attn

    info["exllamav2"] = exllamav2.__version__
    info["flash_attn_paged"] = bool(exllamav2.attn.has_flash_attn_with_paged)
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError as exc:
        info["flash_attn"] = f"not importable ({exc})"
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as exc:
        info["transformers"] = f"not importable ({exc})"
    return info


def bandwidth() -> dict[str, Any]:
    import torch

    size = 2 * 1024**3
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copies = 20
    start.record()
    for _ in range(copies):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_properties(0).name
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    return {
        "device_to_device_copy_tb_s": round(2 * size * copies / seconds / 1e12, 3),
        "note": "a copy reads and writes each byte: both are counted",
        "nominal_tb_s": nominal / 1e12 if nominal else None,
        "nominal_source": f"datasheet value for {name}" if nominal else f"no datasheet value known for {name}",
    }


def weight_bytes_per_token(model_dir: Path) -> dict[str, int]:
    """Bytes of weights a decode step reads: every tensor but the embedding table (one row is read)."""
    total = embedding = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
            total += nbytes
            if name.endswith("embed_tokens.weight"):
                embedding += nbytes
    return {"all_weights": total, "read_per_token": total - embedding}


# (1) The engine alone


def raw_exllamav2(model_dir: Path, check: Check) -> dict[str, Any]:
    import dataclasses

    import exllamav2.attn
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    from backends.base import SamplingParams
    from backends.exllamav2.sampling import sampler_settings_kwargs

    kwargs = sampler_settings_kwargs(SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    fields = {f.name for f in dataclasses.fields(ExLlamaV2Sampler.Settings)}
    switched_or_state = {
        "mirostat_tau", "mirostat_eta", "mirostat_mu", "post_sampling_hooks", "dry_allowed_length",
        "dry_base", "dry_sequence_breakers", "dry_range", "dry_max_ngram", "ngram_trie", "ngram_index",
        "ngram_history", "xtc_threshold", "xtc_ignore_tokens",
    }  # fmt: skip
    sampler_fields = {
        "unknown_to_exllamav2": sorted(set(kwargs) - fields),
        "left_to_exllamav2_defaults": sorted(fields - set(kwargs) - switched_or_state),
    }

    paged = bool(exllamav2.attn.has_flash_attn_with_paged)
    config = ExLlamaV2Config(str(model_dir))
    config.arch_compat_overrides(quiet=True)
    config.max_seq_len = MAX_SEQ_LEN
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=MAX_SEQ_LEN, lazy=True)
    load_started = time.monotonic()
    model.load_autosplit(cache)
    load_seconds = time.monotonic() - load_started
    tokenizer = ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(
        model=model, cache=cache, tokenizer=tokenizer, max_batch_size=1, max_seq_len=MAX_SEQ_LEN, paged=paged
    )
    generator.warmup()

    rng = random.Random(1)
    runs = []
    for index in range(REPEATS + 1):  # the first run warms up and is not counted
        if index and check.left() < 30:
            break
        prompt = random_prompt_ids(rng, PROMPT_TOKENS)
        job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([prompt], dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            gen_settings=ExLlamaV2Sampler.Settings(**kwargs),
            stop_conditions=[EOS_ID],
            identifier=index,
        )
        generator.enqueue(job)
        arrivals: list[float] = []
        tokens = 0
        final: dict[str, Any] = {}
        while generator.num_remaining_jobs():
            for result in generator.iterate():
                if result.get("stage") != "streaming":
                    continue
                ids = result.get("token_ids")
                if ids is not None and ids.shape[-1]:
                    tokens += int(ids.shape[-1])
                    arrivals.append(time.perf_counter())
                if result.get("eos"):
                    final = result
        if index == 0:
            continue
        runs.append(
            {
                "completion_tokens": tokens,
                "eos_reason": final.get("eos_reason"),
                "decode_tokens_per_s": decode_rate(tokens, arrivals[0], arrivals[-1]),
                "engine_decode_tokens_per_s": final["new_tokens"] / final["time_generate"],
                "prompt_tokens_per_s": (PROMPT_TOKENS - 1) / final["time_prefill"],
                "ttft_ms": 1000 * (final["time_enqueued"] + final["time_prefill"]),
            }
        )
    model.unload()
    del generator, cache, model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "paged": paged,
        "mode": "paged (flash-attn)" if paged else "unpaged, one sequence at a time (no flash-attn)",
        "load_seconds": round(load_seconds, 1),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "sampler_fields": sampler_fields,
        "runs": runs,
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "engine_decode_tokens_per_s": statistics.median(r["engine_decode_tokens_per_s"] for r in runs),
        "prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in runs),
    }


# (2) and (5) Through a live gateway


def gateway_config(path: Path, model_dir: Path, db_url: str) -> Path:
    import yaml

    config = {
        "host": "127.0.0.1",
        "port": PORT,
        "database_url": db_url,
        "log_format": "json",
        "models": [
            {
                "name": MODEL_NAME,
                "backend": "exllamav2",
                "path": str(model_dir),
                "template": "llama-2",
                "context_length": MAX_SEQ_LEN,
                "max_concurrency": 4,
                "max_queue": 32,
                "pricing": {"input_per_million": "0.65", "output_per_million": "2.75"},
                "options": {"max_seq_len": MAX_SEQ_LEN, "cache_mode": "fp16", "max_batch_size": 4},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from gateway.cli.main import main; main()", *args]


def create_api_key(config: Path, env: dict[str, str]) -> tuple[str | None, dict[str, Any]]:
    """An admin key from ``llama-gateway keys create --json`` (after ``db upgrade``)."""
    notes: dict[str, Any] = {}
    upgrade = subprocess.run(cli("db", "upgrade", "--config", str(config)), env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    notes["db_upgrade_rc"] = upgrade.returncode
    if upgrade.returncode:
        notes["db_upgrade_stderr"] = upgrade.stderr[-1500:]
    created = subprocess.run(cli("keys", "create", "--name", "gpu-check", "--scope", "admin", "--json",
                                 "--config", str(config)),
                             env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    notes["keys_create_rc"] = created.returncode
    if created.returncode:
        notes["keys_create_stderr"] = created.stderr[-1500:]
        return None, notes
    try:
        return str(json.loads(created.stdout)["key"]), notes
    except (ValueError, KeyError) as exc:
        notes["keys_create_stdout"] = created.stdout[-500:]
        notes["keys_create_error"] = f"no 'key' in its JSON output: {exc}"
        return None, notes


class Gateway:
    """``llama-gateway serve`` in a subprocess, its output in OUT/gateway.log."""

    def __init__(self, out: Path, work: Path, model_dir: Path) -> None:
        self.log_path = out / "gateway.log"
        self.env = {**os.environ, "LLAMA_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{work}/gw.db"}
        self.config = gateway_config(work / "gateway.yaml", model_dir, self.env["LLAMA_GATEWAY_DATABASE_URL"])
        self.process: subprocess.Popen[bytes] | None = None
        self.key: str | None = None
        self.notes: dict[str, Any] = {}

    def start(self, timeout: float) -> dict[str, Any]:
        import httpx

        self.key, self.notes = create_api_key(self.config, self.env)
        log(f"gateway: api key {'created' if self.key else 'NOT created: ' + json.dumps(self.notes)[:300]}")
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                cli("serve", "--config", str(self.config), "--port", str(PORT)),
                env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=2).status_code == 200:
                    return {"ready_seconds": round(time.monotonic() - started, 1), **self.notes}
            time.sleep(1)
        raise TimeoutError(f"the gateway was not ready within {timeout:.0f} s: {self.log_tail()}")

    def client(self, timeout: float = 120) -> Any:
        import openai

        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{PORT}/v1",
            api_key=self.key or "no-key",
            max_retries=0,
            timeout=timeout,
        )

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def prompt_text(seed: int, words: int = 480) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def stream_once(client: Any, content: str, max_tokens: int) -> dict[str, Any]:
    sent = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": max_tokens},
    )
    arrivals: list[float] = []
    finish_at, finish_reason, usage = None, None, None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta and choice.delta.content:
                arrivals.append(now)
            if choice.finish_reason:
                finish_at, finish_reason = now, choice.finish_reason
        if chunk.usage:
            usage = chunk.usage
    if not arrivals or usage is None:
        raise RuntimeError(f"stream had {len(arrivals)} content chunks and usage {usage!r}")
    last = finish_at or arrivals[-1]
    gaps = [1000 * (b - a) for a, b in itertools.pairwise(arrivals)]
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "finish_reason": finish_reason,
        "content_chunks": len(arrivals),
        "decode_tokens_per_s": decode_rate(usage.completion_tokens, arrivals[0], last),
        "ttft_ms": 1000 * (arrivals[0] - sent),
        "itl_mean_ms": statistics.fmean(gaps) if gaps else None,
        "itl_p50_ms": percentile(gaps, 50) if gaps else None,
        "itl_p99_ms": percentile(gaps, 99) if gaps else None,
    }


def gateway_stream(gateway: Gateway, check: Check) -> dict[str, Any]:
    client = gateway.client()
    stream_once(client, prompt_text(0), 16)  # warm-up
    runs = []
    for index in range(REPEATS):
        if index and check.left() < 20:
            break
        runs.append(stream_once(client, prompt_text(index + 1), NEW_TOKENS))
    result: dict[str, Any] = {"runs": runs}
    for key in ("decode_tokens_per_s", "ttft_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms"):
        result[key] = statistics.median(r[key] for r in runs)
    result["all_completions_full_length"] = all(r["completion_tokens"] == NEW_TOKENS for r in runs)
    return result


def chat(client: Any, content: str, **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": content}], **kwargs)


def collect_stream(client: Any, content: str, **kwargs: Any) -> tuple[str, str | None, Any]:
    text, finish, usage = [], None, None
    stream = chat(client, content, stream=True, stream_options={"include_usage": True}, **kwargs)
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return "".join(text), finish, usage


def pick_stop(text: str) -> str | None:
    """A short run of letters from the middle of ``text``, to use as a stop sequence."""
    for start in range(len(text) // 4, len(text) - 3):
        candidate = text[start : start + 3]
        if candidate.isalnum() and text.find(candidate) > 0:
            return candidate
    return None


def conformance(gateway: Gateway) -> dict[str, Any]:
    client = gateway.client(timeout=60)
    checks: dict[str, Any] = {}

    def record(name: str, run: Callable[[], dict[str, Any]]) -> None:
        try:
            outcome = run()
        except Exception as exc:
            outcome = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        checks[name] = outcome
        log(f"conformance {name}: {'pass' if outcome.get('passed') else 'FAIL'}")

    question = "Name the capital of France and describe it in one sentence."
    reference: dict[str, Any] = {}

    def plain() -> dict[str, Any]:
        reply = chat(client, question, max_tokens=48)
        choice, usage = reply.choices[0], reply.usage
        reference["text"] = choice.message.content
        counts_add_up = usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        return {
            "passed": isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
            and counts_add_up and 0 < usage.completion_tokens <= 48,
            "finish_reason": choice.finish_reason,
            "usage": usage.model_dump(),
            "content_head": (choice.message.content or "")[:120],
        }  # fmt: skip

    def streamed() -> dict[str, Any]:
        text, finish, usage = collect_stream(client, question, max_tokens=48)
        return {
            "passed": finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0,
            "finish_reason": finish,
            "usage": usage.model_dump() if usage else None,
            "same_text_as_plain_greedy": text == reference.get("text"),
        }

    def stop_sequence() -> dict[str, Any]:
        full = reference.get("text") or chat(client, question, max_tokens=48).choices[0].message.content
        stop = pick_stop(full)
        if stop is None:
            return {"passed": False, "error": f"no stop candidate in the greedy text {full[:80]!r}"}
        expected = full[: full.find(stop)]
        reply = chat(client, question, max_tokens=48, stop=[stop])
        text, finish, _ = collect_stream(client, question, max_tokens=48, stop=[stop])
        plain_ok = reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
        stream_ok = text == expected and finish == "stop"
        return {
            "passed": plain_ok and stream_ok,
            "stop": stop,
            "plain": {"finish_reason": reply.choices[0].finish_reason, "ok": plain_ok},
            "stream": {"finish_reason": finish, "ok": stream_ok, "contains_stop": stop in text},
        }

    def eos_not_counted() -> dict[str, Any]:
        # A +100 bias on EOS ends generation as soon as min_tokens lets it: at token 6, uncounted.
        forced = {"max_tokens": 20, "extra_body": {"min_tokens": 5}, "logit_bias": {str(EOS_ID): 100}}
        reply = chat(client, question, **forced)
        _, finish, usage = collect_stream(client, question, **forced)
        plain = (reply.choices[0].finish_reason, reply.usage.completion_tokens)
        streamed = (finish, usage.completion_tokens if usage else None)
        return {
            "passed": plain == ("stop", 5) and streamed == ("stop", 5),
            "plain": {"finish_reason": plain[0], "completion_tokens": plain[1]},
            "stream": {"finish_reason": streamed[0], "completion_tokens": streamed[1]},
        }

    def cancellation() -> dict[str, Any]:
        # A random-weight model may sample a byte token that never completes a character; exllamav2
        # then holds the text back and no chunk arrives. A read timeout ends the wait either way.
        long = chat(client, "Write a very long story.", max_tokens=3000, stream=True,
                    extra_body={"min_tokens": 3000}, timeout=5.0)  # fmt: skip
        received, silent = 0, False
        try:
            for chunk in long:
                if chunk.choices and chunk.choices[0].delta.content:
                    received += 1
                    if received >= 5:
                        break
        except Exception as exc:  # the SDK's APITimeoutError (openai is imported lazily)
            if type(exc).__name__ != "APITimeoutError":
                raise
            silent = True
        long.close()
        closed = time.perf_counter()
        reply = chat(client, question, max_tokens=8)
        follow_up_s = time.perf_counter() - closed
        # Unpaged exllamav2 runs one sequence: had the cancelled one kept going, the follow-up would
        # wait for ~3000 tokens (tens of seconds).
        return {
            "passed": follow_up_s < 10 and reply.choices[0].finish_reason in ("stop", "length"),
            "chunks_before_close": received,
            "closed_after_silence": silent,
            "follow_up_seconds": round(follow_up_s, 2),
        }

    def concurrent() -> dict[str, Any]:
        def one(index: int) -> dict[str, Any]:
            sent = time.perf_counter()
            reply = chat(client, f"{question} ({index})", max_tokens=32, extra_body={"min_tokens": 32})
            return {
                "seconds": round(time.perf_counter() - sent, 2),
                "finish_reason": reply.choices[0].finish_reason,
                "completion_tokens": reply.usage.completion_tokens,
            }

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(one, range(4)))
        return {
            "passed": all(r["completion_tokens"] == 32 and r["finish_reason"] == "length" for r in replies),
            "replies": replies,
        }

    def json_schema() -> dict[str, Any]:
        schema = {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "country": {"type": "string", "enum": ["France", "Germany", "Italy"]},
                "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
            },
            "required": ["city", "country", "landmarks"],
            "additionalProperties": False,
        }
        response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
        outcomes = []
        for seed in range(3):
            reply = chat(client, question, max_tokens=200, temperature=1, seed=seed, response_format=response_format)
            choice = reply.choices[0]
            try:
                value = json.loads(choice.message.content or "")
                valid = (
                    set(value) == {"city", "country", "landmarks"}
                    and value["country"] in schema["properties"]["country"]["enum"]
                    and len(value["landmarks"]) <= 3
                )
            except ValueError:
                valid = False
            outcomes.append({"finish_reason": choice.finish_reason, "valid": valid,
                             "completion_tokens": reply.usage.completion_tokens})  # fmt: skip
        return {"passed": all(o["valid"] and o["finish_reason"] == "stop" for o in outcomes), "replies": outcomes}

    def forced_tool_call() -> dict[str, Any]:
        tool = {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 24}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
        reply = chat(client, "What is the weather in Paris?", max_tokens=100, temperature=1, seed=1, tools=[tool],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     parallel_tool_calls=False)  # fmt: skip
        calls = reply.choices[0].message.tool_calls or []
        arguments = [json.loads(c.function.arguments) for c in calls]
        return {
            "passed": reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1
            and calls[0].function.name == "get_weather" and set(arguments[0]) == {"city"},
            "finish_reason": reply.choices[0].finish_reason,
            "arguments": arguments,
        }  # fmt: skip

    def logprobs() -> dict[str, Any]:
        reply = chat(client, question, max_tokens=16, logprobs=True, top_logprobs=5)
        entries = reply.choices[0].logprobs.content if reply.choices[0].logprobs else None
        entries = entries or []
        greedy_is_top = all(e.top_logprobs and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4 for e in entries)
        mass_ok = all(sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-4 for e in entries)
        return {
            "passed": len(entries) == reply.usage.completion_tokens and greedy_is_top and mass_ok,
            "entries": len(entries),
            "completion_tokens": reply.usage.completion_tokens,
            "greedy_is_top": greedy_is_top,
            "top_mass_at_most_1": mass_ok,
        }

    record("chat", plain)
    record("chat_stream", streamed)
    record("stop_sequence", stop_sequence)
    record("eos_not_counted", eos_not_counted)
    record("cancellation", cancellation)
    record("concurrent_4", concurrent)
    record("json_schema", json_schema)
    record("forced_tool_call", forced_tool_call)
    record("logprobs", logprobs)
    return {"passed": all(c.get("passed") for c in checks.values()), "checks": checks}


def paged_batching(gateway: Gateway, paged: bool) -> dict[str, Any]:
    if not paged:
        return {
            "available": False,
            "reason": "flash-attn >= 2.5.7 is not importable here, so exllamav2 runs unpaged: one sequence "
            "at a time, concurrent requests queue (continuous batching not measured)",
        }
    client = gateway.client()
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda i: stream_once(client, prompt_text(100 + i), 128), range(4)))
    seconds = time.perf_counter() - started
    return {
        "available": True,
        "concurrent_streams": 4,
        "aggregate_tokens_per_s": sum(r["completion_tokens"] for r in runs) / seconds,
        "per_stream_decode_tokens_per_s": [r["decode_tokens_per_s"] for r in runs],
    }


# (3) Hugging Face transformers


def hf_transformers(model_dir: Path) -> dict[str, Any]:
    import torch
    import transformers

    started = time.monotonic()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float16, device_map="cuda")
    model.eval()
    load_seconds = time.monotonic() - started
    prompt = torch.tensor([random_prompt_ids(random.Random(2), PROMPT_TOKENS)], device="cuda")
    mask = torch.ones_like(prompt)

    def timed_generate(new_tokens: int) -> float:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=0, eos_token_id=EOS_ID,
            )  # fmt: skip
        torch.cuda.synchronize()
        assert output.shape[-1] == PROMPT_TOKENS + new_tokens, output.shape
        return time.perf_counter() - begin

    timed_generate(8)  # warm-up
    first = statistics.median(timed_generate(1) for _ in range(3))
    full = timed_generate(NEW_TOKENS)
    return {
        "load_seconds": round(load_seconds, 1),
        "attention": "transformers default (sdpa)",
        "prompt_tokens_per_s": PROMPT_TOKENS / first,
        "decode_tokens_per_s": (NEW_TOKENS - 1) / (full - first),
        "note": "decode: the tokens after the first over (time for all) - (time for the first, i.e. prefill)",
    }


# (4) Bandwidth fraction and the summary


def bandwidth_fraction(report: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    steps = report["steps"]
    bytes_ = weight_bytes_per_token(model_dir)
    copy = steps.get("bandwidth", {})
    measured = copy.get("device_to_device_copy_tb_s")
    nominal = copy.get("nominal_tb_s")
    # Llama-2-7B: K and V, 32 layers x 32 heads x 128, fp16; mean context during decode.
    kv_per_position = 2 * 32 * 32 * 128 * 2
    kv_mean = kv_per_position * (PROMPT_TOKENS + NEW_TOKENS / 2)
    result: dict[str, Any] = {
        "weight_bytes_per_token": bytes_["read_per_token"],
        "kv_cache_bytes_per_token_mean": int(kv_mean),
        "measured_copy_tb_s": measured,
        "nominal_tb_s": nominal,
    }
    for name in ("raw_exllamav2", "gateway_stream", "hf_transformers"):
        rate = steps.get(name, {}).get("decode_tokens_per_s")
        if not rate:
            continue
        entry: dict[str, Any] = {"decode_tokens_per_s": rate}
        for label, bw in (("measured", measured), ("nominal", nominal)):
            if bw:
                entry[f"fraction_of_{label}_weights_only"] = rate * bytes_["read_per_token"] / (bw * 1e12)
                entry[f"fraction_of_{label}_with_kv"] = rate * (bytes_["read_per_token"] + kv_mean) / (bw * 1e12)
        result[name] = entry
    return result


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    steps = report["steps"]
    raw = steps.get("raw_exllamav2", {}).get("decode_tokens_per_s")
    gw = steps.get("gateway_stream", {}).get("decode_tokens_per_s")
    ratio = gw / raw if raw and gw else None
    return {
        "gateway_over_raw_decode": ratio,
        "gateway_at_least_0_95_of_raw": ratio is not None and ratio >= 0.95,
        "conformance_passed": steps.get("conformance", {}).get("passed"),
    }


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "n/a" if value is None else str(value)


def summary(report: dict[str, Any]) -> str:
    s = report["steps"]
    env, raw, gw = s.get("environment", {}), s.get("raw_exllamav2", {}), s.get("gateway_stream", {})
    hf, bw, frac = s.get("hf_transformers", {}), s.get("bandwidth", {}), s.get("bandwidth_fraction", {})
    conf, paged, v = s.get("conformance", {}), s.get("paged_batching", {}), report.get("verdict", {})
    t = report.get("timings", {})
    raw_frac, weights = frac.get("raw_exllamav2", {}), frac.get("weight_bytes_per_token")
    lines = [
        "=== llama-gateway exllamav2 GPU check ===",
        f"GPU {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB, sm {env.get('capability')}), torch "
        f"{env.get('torch')} cu{env.get('torch_cuda')}, exllamav2 {env.get('exllamav2')}, "
        f"flash-attn: {env.get('flash_attn')}",
        f"setup: wheels {fmt(t.get('wheel_install_s'))} s, "
        f"extension build {fmt(t.get('extension_build_s'))} s, "
        f"7B model written in {fmt(t.get('model_write_s'))} s ({env.get('model_files_gib')} GiB)",
        f"workload: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, EOS held off (min tokens)",
        f"(1) raw exllamav2 [{raw.get('mode', raw.get('status'))}]: "
        f"decode {fmt(raw.get('decode_tokens_per_s'))} "
        f"tok/s (engine timer {fmt(raw.get('engine_decode_tokens_per_s'))}), prompt "
        f"{fmt(raw.get('prompt_tokens_per_s'), 0)} tok/s",
        f"(2) gateway + OpenAI SDK stream: decode {fmt(gw.get('decode_tokens_per_s'))} tok/s, TTFT "
        f"{fmt(gw.get('ttft_ms'))} ms, ITL mean/p50/p99 {fmt(gw.get('itl_mean_ms'), 2)}/"
        f"{fmt(gw.get('itl_p50_ms'), 2)}/{fmt(gw.get('itl_p99_ms'), 2)} ms [{gw.get('status')}]",
        f"    gateway / raw decode = {fmt(v.get('gateway_over_raw_decode'), 3)} "
        f"(target >= 0.95: {'MET' if v.get('gateway_at_least_0_95_of_raw') else 'NOT MET'})",
        f"(3) HF transformers generate: decode {fmt(hf.get('decode_tokens_per_s'))} tok/s, prompt "
        f"{fmt(hf.get('prompt_tokens_per_s'), 0)} tok/s [{hf.get('status')}]",
        f"(4) bandwidth: copy {fmt(bw.get('device_to_device_copy_tb_s'), 2)} TB/s measured, "
        f"{fmt(bw.get('nominal_tb_s'), 2)} TB/s nominal; raw decode reads "
        f"{fmt(weights / 1e9 if weights else None, 2)} GB/token = "
        f"{fmt(raw_frac.get('fraction_of_measured_weights_only'), 2)} of measured, "
        f"{fmt(raw_frac.get('fraction_of_nominal_weights_only'), 2)} of nominal (weights only)",
        f"(5) conformance: {'PASS' if conf.get('passed') else 'FAIL'} "
        + ", ".join(f"{k} {'ok' if c.get('passed') else 'FAIL'}" for k, c in conf.get("checks", {}).items()),
        f"    paged batching: {'measured' if paged.get('available') else 'UNAVAILABLE'}"
        + (f" ({paged.get('reason')})" if paged.get("reason") else ""),
    ]
    failed = [f"{name}: {step.get('status')} {step.get('error') or step.get('reason') or ''}".strip()
              for name, step in s.items() if step.get("status") != "ok"]  # fmt: skip
    if failed:
        lines.append("not ok: " + " | ".join(f[:200] for f in failed))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds by which to finish")
    parser.add_argument("--timings", type=Path, help="JSON of the set-up timings run_check.sh measured")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {}}
    if args.timings and args.timings.is_file():
        report["timings"] = json.loads(args.timings.read_text())
    check = Check(args.out, args.deadline, report)
    log(f"budget: {check.left():.0f} s left")

    env = check.step("environment", 5, lambda: environment(args))
    check.step("bandwidth", 10, bandwidth)
    check.step("raw_exllamav2", 60, lambda: raw_exllamav2(args.model_dir, check))
    gateway = Gateway(args.out, args.work, args.model_dir)
    try:
        up = check.step("gateway_start", 60, lambda: gateway.start(timeout=min(240.0, check.left() - 30)))
        if up is not None:
            check.step("gateway_stream", 25, lambda: gateway_stream(gateway, check))
            check.step("conformance", 30, lambda: conformance(gateway))
            paged = bool(env and env.get("flash_attn_paged"))
            check.step("paged_batching", 5 if not paged else 30, lambda: paged_batching(gateway, paged))
        else:
            for name in ("gateway_stream", "conformance", "paged_batching"):
                report["steps"][name] = {"status": "skipped", "reason": "the gateway did not start"}
    finally:
        gateway.stop()
    check.step("hf_transformers", 45, lambda: hf_transformers(args.model_dir))
    check.step("bandwidth_fraction", 0, lambda: bandwidth_fraction(report, args.model_dir))
    report["verdict"] = verdict(report)
    text = summary(report)
    report["summary"] = text.splitlines()
    check.save()
    (args.out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 0 if all(step.get("status") == "ok" for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
