"""Shared by the exllamav2 tests: a stand-in for exllamav2 0.3.2 (its sampler settings, dynamic
generator and jobs, model, caches and torch), a model directory, and the helpers the tests share."""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from backends.config import BackendConfig

EOS = 2
VOCAB_SIZE = 32000
PADDED_VOCAB_SIZE = 32032
SCRIPTED_LOGIT = 10.0
"""The scripted token's logit in the rows filters see; every other token's is 0."""

# `ExLlamaV2Sampler.Settings` of exllamav2 0.3.2, field by field with its default.
EXLLAMAV2_SETTINGS_DEFAULTS: dict[str, Any] = {
    "token_repetition_penalty": 1.025,
    "token_repetition_range": -1,
    "token_repetition_decay": 0,
    "token_frequency_penalty": 0.0,
    "token_presence_penalty": 0.0,
    "temperature": 0.8,
    "smoothing_factor": 0.0,
    "min_temp": 0,
    "max_temp": 0.0,
    "temp_exponent": 1.0,
    "top_k": 50,
    "top_p": 0.8,
    "top_a": 0.0,
    "min_p": 0,
    "tfs": 0,
    "typical": 0,
    "skew": 0,
    "temperature_last": False,
    "mirostat": False,
    "mirostat_tau": 1.5,
    "mirostat_eta": 0.1,
    "mirostat_mu": None,
    "token_bias": None,
    "cfg_scale": None,
    "post_sampling_hooks": None,
    "dry_allowed_length": 2,
    "dry_base": 1.75,
    "dry_multiplier": 0.0,
    "dry_sequence_breakers": None,
    "dry_range": 0,
    "dry_max_ngram": 20,
    "ngram_trie": None,
    "ngram_index": 0,
    "ngram_history": None,
    "xtc_probability": 0.0,
    "xtc_threshold": 0.1,
    "xtc_ignore_tokens": None,
}


def model_config(**options: Any) -> BackendConfig:
    return BackendConfig(name="llama-2-70b-chat", path="/models/llama", options=options)


def write_model_dir(path: Path, tokenizer_dir: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}', encoding="utf-8")
    shutil.copy(tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path


def assert_one_sentence(exc: BaseException) -> None:
    message = str(exc)
    assert "\n" not in message
    assert "Traceback" not in message
    assert message.startswith("model 'llama-2-70b-chat': ")


def decoder(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


class FakeTensor:
    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def flatten(self) -> FakeTensor:
        return self

    def tolist(self) -> list[Any]:
        return list(self.values)

    def __setitem__(self, index: int, value: Any) -> None:
        self.values[index] = value


class FakeSeqTensor:
    """`exllamav2.util.SeqTensor` of shape (1, n): what a job's sequence is read through."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)

    def __len__(self) -> int:
        return len(self.values)

    def append(self, token: int) -> None:
        self.values.append(token)

    def torch_slice(self, start: int | None, end: int | None) -> FakeTensor:
        return FakeTensor(self.values[start:end])


@dataclasses.dataclass
class FakeSequence:
    sequence_ids: FakeSeqTensor


FakeSettings = dataclasses.make_dataclass(
    "FakeSettings",
    [(name, Any, dataclasses.field(default=value)) for name, value in EXLLAMAV2_SETTINGS_DEFAULTS.items()],
)


class FakeJob:
    """`ExLlamaV2DynamicJob`'s keyword arguments, as in exllamav2 0.3.2."""

    def __init__(
        self,
        input_ids: FakeTensor,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        gen_settings: Any = None,
        seed: int | None = None,
        stop_conditions: list[int] | None = None,
        decode_special_tokens: bool = False,
        identifier: object = None,
        filters: list[Any] | None = None,
    ) -> None:
        self.input_ids, self.max_new_tokens, self.min_new_tokens = input_ids, max_new_tokens, min_new_tokens
        self.gen_settings, self.seed, self.identifier = gen_settings, seed, identifier
        self.stop_tokens = set(stop_conditions or [])
        self.decode_special_tokens = decode_special_tokens
        self.filters = filters or []
        self.new_tokens = 0
        # The prompt, then every sampled token as soon as it is sampled (exllamav2's
        # ``receive_sample``), whether or not its text is held back.
        self.sequences = [FakeSequence(FakeSeqTensor(list(input_ids.values)))]
        self.held: list[int] = []
        self.script: Iterator[int] = iter(())


class FakeGenerator:
    """Streams scripted tokens the way exllamav2 0.3.2's `iterate()` reports them."""

    script: ClassVar[list[int]] = []
    instances: ClassVar[list[FakeGenerator]] = []
    failures: ClassVar[list[Exception]] = []

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Any,
        max_batch_size: int | None = None,
        max_seq_len: int | None = None,
        max_chunk_size: int | None = None,
        paged: bool = True,
    ) -> None:
        self.model, self.cache, self.paged = model, cache, paged
        self.max_batch_size, self.max_seq_len, self.max_chunk_size = (
            max_batch_size,
            max_seq_len,
            max_chunk_size,
        )
        self.pending: list[FakeJob] = []
        self.active: list[FakeJob] = []
        self.cancelled: list[FakeJob] = []
        self.enqueued: list[FakeJob] = []
        self.warmed_up = False
        FakeGenerator.instances.append(self)

    def warmup(self) -> None:
        self.warmed_up = True

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def enqueue(self, job: FakeJob) -> None:
        job.script = itertools.cycle(self.script) if self.script[-1:] == [-1] else iter(self.script)
        self.pending.append(job)
        self.enqueued.append(job)

    def cancel(self, job: FakeJob) -> None:
        self.cancelled.append(job)
        for jobs in (self.pending, self.active):
            if job in jobs:
                jobs.remove(job)

    def clear_queue(self) -> None:
        self.pending.clear()
        self.active.clear()

    def iterate(self) -> list[dict[str, Any]]:
        time.sleep(0.001)
        if self.failures:
            raise self.failures.pop()
        while self.pending and len(self.active) < (self.max_batch_size or 1):
            self.active.append(self.pending.pop(0))
        results = []
        for job in list(self.active):
            token = next(job.script)
            if token == -1:
                token = 1000
            if job.filters:
                token = _sample_through_filters(job, token)
            elif job.new_tokens < job.min_new_tokens and token in job.stop_tokens:
                token = 1001
            job.new_tokens += 1
            job.sequences[0].sequence_ids.append(token)
            job.held.append(token)
            result: dict[str, Any] = {"job": job, "stage": "streaming", "identifier": job.identifier}
            if token in job.stop_tokens:
                result.update(eos=True, eos_reason="stop_token", held={"token_ids": FakeTensor(job.held)})
            elif job.new_tokens >= job.max_new_tokens:
                result.update(eos=True, eos_reason="max_new_tokens", token_ids=FakeTensor(job.held))
            elif 3 <= token < 259 and not _complete_utf8([t - 3 for t in job.held if 3 <= t < 259]):
                result.update(eos=False)  # exllamav2 holds an incomplete character back
                results.append(result)
                continue
            else:
                result.update(eos=False, token_ids=FakeTensor(job.held))
            job.held = []
            if result["eos"]:
                self.active.remove(job)
            results.append(result)
        return results


class FakeFilter:
    """`ExLlamaV2Filter`'s constructor; `_sample_through_filters` calls the rest as exllamav2 does."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer


class FakeLogits:
    def __init__(self, row: np.ndarray[Any, Any]) -> None:
        self.row = row

    def numpy(self) -> np.ndarray[Any, Any]:
        return self.row


def _sample_through_filters(job: FakeJob, scripted: int) -> int:
    """exllamav2 0.3.2's sampler with filters that mask logits: a row favouring the scripted token,
    stop tokens banned below min_new_tokens, each filter's mask, then greedy; every filter is fed."""
    row = np.zeros(PADDED_VOCAB_SIZE, dtype=np.float32)
    row[scripted] = SCRIPTED_LOGIT
    if job.new_tokens < job.min_new_tokens:
        row[list(job.stop_tokens)] = -1e30
    for f in job.filters:
        if job.new_tokens == 0:
            f.begin("")
        assert f.can_mask_logits()
        assert f.prepare_logit_mask()
        f.mask_logits(FakeLogits(row))
    row[VOCAB_SIZE:] = -np.inf
    token = int(np.argmax(row))
    for f in job.filters:
        f.feed(token)
    return token


def _complete_utf8(data: list[int]) -> bool:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def fake_engine(calls: list[tuple[Any, ...]], *, paged_attention: bool = False) -> SimpleNamespace:
    class Config:
        def __init__(self, model_dir: str) -> None:
            self.model_dir, self.no_flash_attn, self.vocab_size = model_dir, False, 32000
            self.max_seq_len, self.max_input_len, self.max_attention_size = 4096, 2048, 2048**2

        def arch_compat_overrides(self, quiet: bool = False) -> None:
            pass

    class Model:
        def __init__(self, config: Config) -> None:
            self.config = config

        def load(self, gpu_split: list[float] | None = None) -> None:
            calls.append(("load", gpu_split))

        def load_autosplit(self, cache: Any, reserve_vram: Any = None) -> None:
            calls.append(("load_autosplit", type(cache).__name__, cache.lazy, reserve_vram))

        def load_tp(self, gpu_split: Any = None, expect_cache_tokens: int = 0, expect_cache_base: Any = None) -> None:
            calls.append(("load_tp", gpu_split, expect_cache_tokens, expect_cache_base.__name__))

        def unload(self) -> None:
            calls.append(("unload",))

    class Cache:
        def __init__(self, model: Model, max_seq_len: int = -1, lazy: bool = False) -> None:
            self.max_seq_len, self.lazy = max_seq_len, lazy
            calls.append(("cache", type(self).__name__, max_seq_len, lazy))

        def all_tensors(self) -> list[Any]:
            return [SimpleNamespace(device="cuda:0")]

    cache_names = ("ExLlamaV2Cache", "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q4")
    caches = {name: type(name, (Cache,), {}) for name in cache_names}

    class CacheTP(Cache):
        def __init__(self, model: Model, base: type, max_seq_len: int = -1) -> None:
            super().__init__(model, max_seq_len)
            calls.append(("cache_tp", base.__name__, max_seq_len))

    torch = SimpleNamespace(
        long="long",
        float="float",
        tensor=lambda rows, dtype: FakeTensor(list(rows[0])),
        zeros=lambda shape, dtype: FakeTensor([0.0] * shape[0]),
        cuda=SimpleNamespace(
            empty_cache=lambda: None,
            device_count=lambda: 2,
            mem_get_info=lambda i: (30 * 1024**3, 80 * 1024**3),
        ),
    )
    exllamav2 = SimpleNamespace(
        ExLlamaV2Config=Config,
        ExLlamaV2=Model,
        ExLlamaV2Tokenizer=lambda config: SimpleNamespace(eos_token_id=EOS),
        ExLlamaV2Cache_TP=CacheTP,
        **caches,
    )
    return SimpleNamespace(
        torch=torch,
        exllamav2=exllamav2,
        Generator=FakeGenerator,
        Job=FakeJob,
        Settings=FakeSettings,
        Filter=FakeFilter,
        has_paged_attention=paged_attention,
    )
