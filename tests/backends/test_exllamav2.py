"""The exllamav2 backend without a GPU: options, sampler mapping, start-up errors, and the
generator thread driven by a stand-in for exllamav2 0.3.2's dynamic generator."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import py_compile
import shutil
import subprocess
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest

import backends.exllamav2 as exl_backend
from backends.base import (
    Backend,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)
from backends.exllamav2 import (
    ExLlamaV2Backend,
    IncrementalDetokenizer,
    check_model_dir,
    logit_bias_entries,
    parse_options,
    sampler_settings_kwargs,
)
from gateway.settings import ModelConfig
from tests.support.paths import REPO_ROOT

REPO = REPO_ROOT
GPU_CHECK = REPO / "bench" / "gpu"
EOS = 2

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
# Fields that act only when another one switches them on (mirostat, DRY, XTC), or hold state.
SWITCHED_OR_STATE = {
    "mirostat_tau", "mirostat_eta", "mirostat_mu", "post_sampling_hooks",
    "dry_allowed_length", "dry_base", "dry_sequence_breakers", "dry_range", "dry_max_ngram",
    "ngram_trie", "ngram_index", "ngram_history", "xtc_threshold", "xtc_ignore_tokens",
}  # fmt: skip


def model_config(**options: Any) -> ModelConfig:
    return ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path="/models/llama", options=options)


# Options


def test_defaults_follow_the_model_entry() -> None:
    config = ModelConfig(name="m", backend="exllamav2", path="/m", context_length=4096, max_concurrency=4, options={})
    options = parse_options(config)
    assert options == exl_backend.ExLlamaV2Options(
        max_seq_len=4096,
        cache_mode="fp16",
        gpu_split=None,
        autosplit=True,
        tensor_parallel=False,
        reserve_vram_gb=None,
        max_batch_size=4,
        max_chunk_size=2048,
        cache_size=4096 * 4,
        paged=None,
    )


def test_gpu_split_turns_autosplit_off() -> None:
    options = parse_options(model_config(gpu_split=[20, 23.5], cache_mode="q4", max_seq_len=4096))
    assert options.gpu_split == (20.0, 23.5)
    assert not options.autosplit
    assert not options.tensor_parallel
    assert options.cache_mode == "q4"


def test_autosplit_with_reserve_per_gpu() -> None:
    options = parse_options(model_config(autosplit=True, reserve_vram_gb=[1.5, 0.5]))
    assert options.autosplit
    assert options.reserve_vram_gb == (1.5, 0.5)
    assert parse_options(model_config(reserve_vram_gb=2)).reserve_vram_gb == 2.0


def test_tensor_parallel_by_split_or_free_vram() -> None:
    split = parse_options(model_config(tensor_parallel=True, gpu_split=[40, 40], cache_mode="q8"))
    assert split.tensor_parallel
    assert not split.autosplit
    assert split.gpu_split == (40.0, 40.0)
    free = parse_options(model_config(tensor_parallel=True, reserve_vram_gb=1))
    assert free.tensor_parallel
    assert not free.autosplit
    assert free.gpu_split is None


def test_no_split_loads_on_the_first_gpu() -> None:
    options = parse_options(model_config(autosplit=False))
    assert not options.autosplit
    assert options.gpu_split is None


@pytest.mark.parametrize("mode", ["fp16", "q8", "q6", "q4"])
def test_cache_modes(mode: str) -> None:
    assert parse_options(model_config(cache_mode=mode)).cache_mode == mode


def test_paged_and_sizes() -> None:
    options = parse_options(
        model_config(paged=False, max_batch_size=8, max_chunk_size=512, cache_size=16384, max_seq_len=4096)
    )
    assert options.paged is False
    assert options.max_batch_size == 8
    assert (options.max_chunk_size, options.cache_size) == (512, 16384)
    assert parse_options(model_config(paged=True)).paged is True
    assert parse_options(model_config(paged="auto")).paged is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"cache_mode": "q5"}, "'cache_mode' must be one of fp16, q8, q6, q4, not 'q5'"),
        ({"cache_mode": "FP8"}, "'cache_mode' must be one of"),
        ({"max_seq_len": 4000}, "'max_seq_len' must be a multiple of 256"),
        ({"max_seq_len": "4096"}, "'max_seq_len' must be an integer >= 256"),
        ({"max_seq_len": True}, "'max_seq_len' must be an integer"),
        ({"gpu_split": "20,24"}, "'gpu_split' must be a list of GB per GPU"),
        ({"gpu_split": []}, "'gpu_split' must be a list of GB per GPU"),
        ({"gpu_split": [20, -1]}, "'gpu_split' needs numbers of GB >= 0"),
        ({"gpu_split": [20, "24"]}, "'gpu_split' needs numbers of GB >= 0"),
        ({"gpu_split": [0, 0]}, "at least one GPU more than 0 GB"),
        ({"gpu_split": [20, 24], "autosplit": True}, "'autosplit' and 'gpu_split' exclude each other"),
        ({"tensor_parallel": True, "autosplit": True}, "'tensor_parallel' splits by 'gpu_split'"),
        ({"tensor_parallel": "yes"}, "'tensor_parallel' must be true or false"),
        ({"gpu_split": [20, 24], "reserve_vram_gb": 1}, "give less GB per GPU instead"),
        ({"reserve_vram_gb": -1}, "'reserve_vram_gb' needs numbers of GB >= 0"),
        ({"reserve_vram_gb": []}, "'reserve_vram_gb' must not be an empty list"),
        ({"max_batch_size": 0}, "'max_batch_size' must be an integer >= 1"),
        ({"max_batch_size": 1000}, "above the 256 that max_chunk_size 2048 allows"),
        ({"max_chunk_size": 300}, "'max_chunk_size' must be a multiple of 256"),
        ({"cache_size": 1024}, "'cache_size' must be an integer >= 4096"),
        ({"cache_size": 5000}, "'cache_size' must be a multiple of 256"),
        ({"paged": "yes"}, "'paged' must be auto, true or false"),
        ({"gpu_layers": 10}, "unknown exllamav2 option 'gpu_layers'"),
    ],
)
def test_bad_options_fail_with_one_sentence(options: dict[str, Any], words: str) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        parse_options(model_config(**options))
    message = str(caught.value)
    assert words in message
    assert message.startswith("model 'llama-2-70b-chat': ")
    assert "\n" not in message


def test_backend_rejects_bad_options_when_built() -> None:
    with pytest.raises(BackendUnavailable, match="cache_mode"):
        ExLlamaV2Backend(model_config(cache_mode="fp8"))


def test_capabilities_before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exl_backend, "paged_attention_available", lambda: True)
    backend = ExLlamaV2Backend(
        ModelConfig(name="m", backend="exllamav2", path="/m", context_length=4096, max_concurrency=4,
                    options={"max_seq_len": 2048})
    )  # fmt: skip
    assert isinstance(backend, Backend)
    assert backend.capabilities.context_length == 2048
    assert backend.capabilities.max_concurrency == 4
    assert backend.capabilities.supports_logit_bias
    assert backend.capabilities.supports_seed
    unpaged = ExLlamaV2Backend(model_config(paged=False, max_batch_size=4))
    assert unpaged.capabilities.max_concurrency == 1
    monkeypatch.setattr(exl_backend, "paged_attention_available", lambda: False)
    assert ExLlamaV2Backend(model_config(max_batch_size=4)).capabilities.max_concurrency == 1


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.5.7", True), ("2.8.3+cu130torch2.11", True), ("2.5.6", False), ("2.4.2", False)],
)
def test_paged_attention_needs_flash_attn_2_5_7(monkeypatch: pytest.MonkeyPatch, version: str, expected: bool) -> None:
    monkeypatch.delenv("EXLLAMA_NO_FLASH_ATTN", raising=False)
    monkeypatch.setattr(exl_backend.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(exl_backend.importlib.metadata, "version", lambda name: version)
    assert exl_backend.paged_attention_available() is expected
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")
    assert exl_backend.paged_attention_available() is False


# Sampler mapping


def test_sampler_maps_every_request_field() -> None:
    sampling = SamplingParams(
        max_tokens=100, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.15,
        presence_penalty=0.5, frequency_penalty=0.25, seed=7, min_tokens=3, logit_bias={5: 1.0},
    )  # fmt: skip
    kwargs = sampler_settings_kwargs(sampling)
    assert kwargs["temperature"] == 0.7
    assert kwargs["top_p"] == 0.9
    assert kwargs["top_k"] == 40
    assert kwargs["min_p"] == 0.05
    assert kwargs["token_repetition_penalty"] == 1.15
    assert kwargs["token_presence_penalty"] == 0.5
    assert kwargs["token_frequency_penalty"] == 0.25
    assert kwargs["token_repetition_range"] == -1
    assert kwargs["token_repetition_decay"] == 0
    # Bias, seed and token limits travel on the job, not in the settings.
    assert kwargs["token_bias"] is None


def test_neutral_request_is_neutral_in_exllamav2() -> None:
    kwargs = sampler_settings_kwargs(SamplingParams(max_tokens=10))
    assert kwargs["temperature"] == 1.0
    assert kwargs["top_k"] == 0
    assert kwargs["top_p"] == 1.0
    assert kwargs["min_p"] == 0.0
    assert kwargs["token_repetition_penalty"] == 1.0
    assert kwargs["token_presence_penalty"] == 0.0
    assert kwargs["token_frequency_penalty"] == 0.0
    off = {"top_a": 0.0, "tfs": 0.0, "typical": 0.0, "skew": 0.0, "smoothing_factor": 0.0, "min_temp": 0.0,
           "max_temp": 0.0, "temp_exponent": 1.0, "temperature_last": False, "mirostat": False,
           "dry_multiplier": 0.0, "xtc_probability": 0.0, "cfg_scale": None}  # fmt: skip
    assert {k: kwargs[k] for k in off} == off


def test_greedy_keeps_penalties() -> None:
    kwargs = sampler_settings_kwargs(
        SamplingParams(max_tokens=10, temperature=0.0, top_p=0.5, top_k=40, min_p=0.2, repetition_penalty=1.2)
    )
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["min_p"]) == (1.0, 1, 1.0, 0.0)
    assert kwargs["token_repetition_penalty"] == 1.2


def test_every_exllamav2_default_is_overridden() -> None:
    kwargs = sampler_settings_kwargs(SamplingParams(max_tokens=1))
    assert set(kwargs) <= set(EXLLAMAV2_SETTINGS_DEFAULTS), "names unknown to exllamav2 0.3.2"
    assert set(EXLLAMAV2_SETTINGS_DEFAULTS) - SWITCHED_OR_STATE - set(kwargs) == set()


def test_logit_bias_entries() -> None:
    sampling = SamplingParams(max_tokens=1, logit_bias={29871: -100.0, 3: 5.0})
    assert logit_bias_entries(sampling, 32000) == [(3, 5.0), (29871, -100.0)]
    with pytest.raises(GenerationFailed, match="outside the vocabulary of 32000"):
        logit_bias_entries(SamplingParams(max_tokens=1, logit_bias={32000: 1.0}), 32000)
    with pytest.raises(GenerationFailed, match="finite"):
        logit_bias_entries(SamplingParams(max_tokens=1, logit_bias={1: float("nan")}), 32000)


# Incremental detokenization


@pytest.fixture(scope="module")
def hf_tokenizer(llama2_tokenizer_dir: Path) -> Any:
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(llama2_tokenizer_dir / "tokenizer.json"))


def decoder(tokenizer: Any) -> Any:
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        " leading space and  two spaces",
        "Paris is the capital of France.\nNew line.",
        "héllo wörld, naïve café",
        "emoji 🦙🦙 and € signs",
        "中文测试，日本語のテキスト",
        "tabs\tand 1234567 numbers",
    ],
)
def test_deltas_concatenate_to_the_decoded_text(hf_tokenizer: Any, text: str) -> None:
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    deltas = [detokenizer.push([token]) for token in ids] + [detokenizer.flush()]
    assert "".join(deltas) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in delta for delta in deltas)


def test_split_character_is_held_until_complete(hf_tokenizer: Any) -> None:
    euro = [hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    assert detokenizer.push([hf_tokenizer.token_to_id("▁costs")]) == "costs"
    assert detokenizer.push(euro[:1]) == ""
    assert detokenizer.push(euro[1:2]) == ""
    assert detokenizer.push(euro[2:]) == "€"
    assert detokenizer.push([EOS]) == ""
    assert detokenizer.flush() == ""


def test_flush_emits_an_unfinished_character(hf_tokenizer: Any) -> None:
    detokenizer = IncrementalDetokenizer(decoder(hf_tokenizer))
    assert detokenizer.push([hf_tokenizer.token_to_id("<0xE2>")]) == ""
    assert detokenizer.flush() == "\ufffd"


# Start-up errors


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


def test_model_dir_checks(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    missing = ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path=str(tmp_path / "nope"))
    with pytest.raises(BackendUnavailable, match="is not a model directory") as caught:
        check_model_dir(missing)
    assert_one_sentence(caught.value)
    (tmp_path / "empty").mkdir()
    empty = ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path=str(tmp_path / "empty"))
    with pytest.raises(BackendUnavailable, match=r"has no config\.json"):
        check_model_dir(empty)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(BackendUnavailable, match=r"has no tokenizer\.json"):
        check_model_dir(empty)
    model_dir = write_model_dir(tmp_path / "ok", llama2_tokenizer_dir)
    ok = ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path=str(model_dir))
    assert check_model_dir(ok) == model_dir


def gpu_stack_present() -> bool:
    if importlib.util.find_spec("exllamav2") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(gpu_stack_present(), reason="this machine has exllamav2, torch and a GPU")
async def test_start_on_this_machine_fails_with_one_sentence(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model", llama2_tokenizer_dir)
    backend = ExLlamaV2Backend(ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path=str(model_dir)))
    with pytest.raises(BackendUnavailable) as caught:
        await backend.start()
    assert_one_sentence(caught.value)
    assert caught.value.__cause__ is None
    assert any(words in str(caught.value) for words in ("exllamav2 package", "PyTorch", "NVIDIA GPU"))


def fake_torch(*, cuda: str | None, gpus: int) -> ModuleType:
    torch = ModuleType("torch")
    torch.__version__ = "2.11.0"  # type: ignore[attr-defined]
    torch.version = SimpleNamespace(cuda=cuda)  # type: ignore[attr-defined]
    torch.cuda = SimpleNamespace(is_available=lambda: gpus > 0, device_count=lambda: gpus)  # type: ignore[attr-defined]
    return torch


@pytest.mark.parametrize(
    ("installed", "torch", "words"),
    [
        (
            {"torch"},
            None,
            "needs the exllamav2 package, which is not installed (pip install 'llama-gateway[gpu]')",
        ),
        ({"exllamav2"}, None, "needs PyTorch with CUDA, which is not installed"),
        ({"exllamav2", "torch"}, fake_torch(cuda=None, gpus=0), "but PyTorch 2.11.0 has none"),
        ({"exllamav2", "torch"}, fake_torch(cuda="13.0", gpus=0), "needs an NVIDIA GPU, and none is visible"),
        (
            {"exllamav2", "torch"},
            fake_torch(cuda="13.0", gpus=1),
            "could not import exllamav2: RuntimeError: nvcc",
        ),
    ],
)
def test_import_failures_are_one_sentence(
    monkeypatch: pytest.MonkeyPatch, installed: set[str], torch: ModuleType | None, words: str
) -> None:
    def find_spec(name: str) -> object:
        return object() if name in installed else None

    def import_module(name: str) -> ModuleType:
        if name == "torch" and torch is not None:
            return torch
        raise RuntimeError("nvcc failed while building exllamav2_ext\nlong compiler log")

    monkeypatch.setattr(exl_backend.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(exl_backend.importlib, "import_module", import_module)
    with pytest.raises(BackendUnavailable) as caught:
        exl_backend.import_engine("llama-2-70b-chat")
    assert words in str(caught.value)
    assert_one_sentence(caught.value)


# The generator thread, driven by a stand-in for exllamav2's dynamic generator


class FakeTensor:
    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def flatten(self) -> FakeTensor:
        return self

    def tolist(self) -> list[Any]:
        return list(self.values)

    def __setitem__(self, index: int, value: Any) -> None:
        self.values[index] = value


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
    ) -> None:
        self.input_ids, self.max_new_tokens, self.min_new_tokens = input_ids, max_new_tokens, min_new_tokens
        self.gen_settings, self.seed, self.identifier = gen_settings, seed, identifier
        self.stop_tokens = set(stop_conditions or [])
        self.decode_special_tokens = decode_special_tokens
        self.new_tokens = 0
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
            if job.new_tokens < job.min_new_tokens and token in job.stop_tokens:
                token = 1001
            job.new_tokens += 1
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
        has_paged_attention=paged_attention,
    )


@pytest.fixture
def model_dir(tmp_path: Path, llama2_tokenizer_dir: Path) -> Path:
    return write_model_dir(tmp_path / "model", llama2_tokenizer_dir)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    recorded: list[tuple[Any, ...]] = []
    monkeypatch.setattr(exl_backend, "import_engine", lambda name: fake_engine(recorded))
    FakeGenerator.instances.clear()
    return recorded


async def started(model_dir: Path, **options: Any) -> ExLlamaV2Backend:
    backend = ExLlamaV2Backend(
        ModelConfig(name="llama-2-70b-chat", backend="exllamav2", path=str(model_dir), context_length=4096,
                    max_concurrency=4, options=options)
    )  # fmt: skip
    await backend.start()
    return backend


def request(prompt: list[int], **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_ids=prompt, sampling=SamplingParams(**sampling))


async def collect(backend: ExLlamaV2Backend, req: GenerationRequest) -> list[TokenDelta]:
    return [delta async for delta in backend.generate(req)]


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


async def test_stream_text_and_counts(calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any) -> None:
    FakeGenerator.script = [*ids_of(hf_tokenizer, "Paris costs 5 €, café 🦙."), EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1, 518, 25580], max_tokens=50, temperature=0.0, seed=3))
    finally:
        await backend.stop()
    completion = [t for d in deltas for t in d.token_ids]
    assert completion == FakeGenerator.script[:-1], "EOS is not a completion token"
    assert "".join(d.text for d in deltas) == "Paris costs 5 €, café 🦙."
    assert [d.finish_reason for d in deltas][-1] == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    job = FakeGenerator.instances[0].enqueued[0]
    assert job.input_ids.values == [1, 518, 25580]
    assert (job.max_new_tokens, job.min_new_tokens, job.seed, job.stop_tokens) == (50, 0, 3, {EOS})
    assert job.decode_special_tokens is False
    assert job.gen_settings.top_k == 1
    assert job.gen_settings.token_repetition_penalty == 1.0
    assert ("unload",) in calls


async def test_held_character_is_counted_when_eos_follows(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    euro = [hf_tokenizer.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    FakeGenerator.script = [*ids_of(hf_tokenizer, "costs"), *euro[:2], EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=50))
    finally:
        await backend.stop()
    assert [t for d in deltas for t in d.token_ids] == FakeGenerator.script[:-1]
    assert "".join(d.text for d in deltas) == "costs\ufffd\ufffd"
    assert deltas[-1].finish_reason == "stop"


async def test_tokens_held_back_are_counted_while_held(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    # A lone lead byte that never completes a character: exllamav2 releases no token, possibly for
    # thousands of steps, yet every sampled token is billed, and a cancellation mid-hold keeps them.
    costs = ids_of(hf_tokenizer, "costs")
    lead = hf_tokenizer.token_to_id("<0xE2>")
    FakeGenerator.script = [*costs, *[lead] * 200, EOS]
    backend = await started(model_dir)
    try:
        stream = backend.generate(request([1], max_tokens=3000))
        deltas: list[TokenDelta] = []
        async for delta in stream:
            deltas.append(delta)
            if sum(d.tokens for d in deltas) >= len(costs) + 20:
                break
        await stream.aclose()
        job = FakeGenerator.instances[0].enqueued[0]
    finally:
        await backend.stop()
    assert "".join(d.text for d in deltas) == "costs"
    assert [t for d in deltas for t in d.token_ids] == costs  # nothing released after them
    assert sum(d.tokens for d in deltas) == len(costs) + 20
    assert job.new_tokens >= len(costs) + 20


async def test_held_tokens_released_at_eos_are_not_counted_twice(
    calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any
) -> None:
    lead = hf_tokenizer.token_to_id("<0xE2>")
    FakeGenerator.script = [*ids_of(hf_tokenizer, "costs"), *[lead] * 7, EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=50))
    finally:
        await backend.stop()
    assert [t for d in deltas for t in d.token_ids] == FakeGenerator.script[:-1]
    assert sum(d.tokens for d in deltas) == len(FakeGenerator.script) - 1  # EOS not counted
    assert deltas[-1].finish_reason == "stop"


async def test_length_and_min_tokens(calls: list[tuple[Any, ...]], model_dir: Path, hf_tokenizer: Any) -> None:
    FakeGenerator.script = [EOS, *ids_of(hf_tokenizer, "a b c d e f g h"), EOS]
    backend = await started(model_dir)
    try:
        deltas = await collect(backend, request([1], max_tokens=4, min_tokens=2))
    finally:
        await backend.stop()
    completion = [t for d in deltas for t in d.token_ids]
    assert len(completion) == 4
    assert EOS not in completion
    assert deltas[-1].finish_reason == "length"
    assert FakeGenerator.instances[0].enqueued[0].min_new_tokens == 2


async def test_closing_the_stream_cancels_the_job(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [29871, -1]  # endless
    backend = await started(model_dir)
    try:
        stream = backend.generate(request([1], max_tokens=3000))
        assert isinstance(stream, AsyncGenerator)
        received = 0
        async for _delta in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        generator = FakeGenerator.instances[0]
        for _ in range(200):
            if generator.cancelled:
                break
            await asyncio.sleep(0.005)
        assert generator.cancelled == generator.enqueued
        assert generator.num_remaining_jobs() == 0
        FakeGenerator.script = [29871, EOS]
        follow_up = await asyncio.wait_for(collect(backend, request([1], max_tokens=10)), timeout=5)
        assert follow_up[-1].finish_reason == "stop"
    finally:
        await backend.stop()


async def test_engine_failure_fails_the_requests_and_serving_goes_on(
    calls: list[tuple[Any, ...]], model_dir: Path
) -> None:
    FakeGenerator.script = [450, EOS]
    backend = await started(model_dir)
    try:
        FakeGenerator.failures.append(RuntimeError("CUDA error: an illegal memory access\nstack"))
        with pytest.raises(GenerationFailed, match="the engine failed: RuntimeError: CUDA error") as caught:
            await collect(backend, request([1], max_tokens=5))
        assert "\n" not in str(caught.value)
        assert (await collect(backend, request([1], max_tokens=5)))[-1].finish_reason == "stop"
    finally:
        FakeGenerator.failures.clear()
        await backend.stop()


async def test_stop_fails_requests_in_flight(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, -1]  # endless
    backend = await started(model_dir)
    stream = backend.generate(request([1], max_tokens=3000))
    first = await anext(stream)
    assert first.token_ids == (450,)
    await backend.stop()
    with pytest.raises(GenerationFailed, match="the model was stopped"):
        async for _delta in stream:
            pass
    with pytest.raises(BackendUnavailable, match="is not started"):
        await collect(backend, request([1], max_tokens=1))


async def test_concurrent_requests_all_complete(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, 4996, 17354, EOS]
    backend = await started(model_dir)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(backend, request([1, i + 10], max_tokens=20)) for i in range(4))),
            timeout=10,
        )
    finally:
        await backend.stop()
    for deltas in results:
        assert [t for d in deltas for t in d.token_ids] == [450, 4996, 17354]
        assert deltas[-1].finish_reason == "stop"


async def test_logit_bias_becomes_a_padded_tensor(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    FakeGenerator.script = [450, EOS]
    backend = await started(model_dir)
    try:
        await collect(backend, request([1], max_tokens=5, logit_bias={29871: -100.0, 3: 2.5}))
        with pytest.raises(GenerationFailed, match="outside the vocabulary"):
            await collect(backend, request([1], max_tokens=5, logit_bias={40000: 1.0}))
    finally:
        await backend.stop()
    bias = FakeGenerator.instances[0].enqueued[0].gen_settings.token_bias
    assert len(bias.values) == 32000
    assert bias.values[29871] == -100.0
    assert bias.values[3] == 2.5


async def test_requests_beyond_max_seq_len_fail_clearly(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    backend = await started(model_dir, max_seq_len=1024)
    try:
        with pytest.raises(GenerationFailed, match="1000 prompt tokens \\+ 100 new tokens exceed max_seq_len 1024"):
            await collect(backend, request([1] * 1000, max_tokens=100))
    finally:
        await backend.stop()


async def test_generate_before_start_fails(model_dir: Path) -> None:
    backend = ExLlamaV2Backend(ModelConfig(name="m", backend="exllamav2", path=str(model_dir)))
    with pytest.raises(BackendUnavailable, match="is not started"):
        await collect(backend, request([1], max_tokens=1))


async def test_unpaged_mode_runs_one_sequence(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    backend = await started(model_dir, max_batch_size=8)
    await backend.stop()
    generator = FakeGenerator.instances[0]
    assert generator.paged is False
    assert generator.max_batch_size == 1
    assert generator.warmed_up
    assert backend.capabilities.max_concurrency == 1
    assert ("cache", "ExLlamaV2Cache", 4096, True) in calls, "unpaged: the cache holds one sequence"


async def test_paged_mode_batches(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    recorded: list[tuple[Any, ...]] = []
    monkeypatch.setattr(exl_backend, "import_engine", lambda name: fake_engine(recorded, paged_attention=True))
    FakeGenerator.instances.clear()
    backend = await started(model_dir, max_batch_size=8, cache_mode="q4")
    await backend.stop()
    generator = FakeGenerator.instances[0]
    assert generator.paged is True
    assert generator.max_batch_size == 8
    assert backend.capabilities.max_concurrency == 8
    assert ("cache", "ExLlamaV2Cache_Q4", 4096 * 8, True) in recorded


async def test_paged_requested_without_flash_attn(calls: list[tuple[Any, ...]], model_dir: Path) -> None:
    with pytest.raises(BackendUnavailable, match=r"paged: true needs flash-attn >= 2\.5\.7") as caught:
        await started(model_dir, paged=True)
    assert_one_sentence(caught.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, [("cache", "ExLlamaV2Cache", 4096, True), ("load_autosplit", "ExLlamaV2Cache", True, None)]),
        (
            {"reserve_vram_gb": [1, 0.5], "cache_mode": "q8"},
            [("cache", "ExLlamaV2Cache_Q8", 4096, True),
             ("load_autosplit", "ExLlamaV2Cache_Q8", True, [1024**3, 512 * 1024**2])],
        ),
        (
            {"gpu_split": [20, 24], "cache_mode": "q4"},
            [("load", [20.0, 24.0]), ("cache", "ExLlamaV2Cache_Q4", 4096, False)],
        ),
        (
            {"autosplit": False, "cache_mode": "q6"},
            [("load", None), ("cache", "ExLlamaV2Cache_Q6", 4096, False)],
        ),
        (
            {"tensor_parallel": True, "gpu_split": [40, 40], "cache_mode": "q4"},
            [("load_tp", [40.0, 40.0], 4096, "ExLlamaV2Cache_Q4"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache_Q4", 4096)],
        ),
        (
            {"tensor_parallel": True, "reserve_vram_gb": 2},
            [("load_tp", [28.0, 28.0], 4096, "ExLlamaV2Cache"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache", 4096)],
        ),
        (
            {"tensor_parallel": True},
            [("load_tp", None, 4096, "ExLlamaV2Cache"), ("cache", "CacheTP", 4096, False),
             ("cache_tp", "ExLlamaV2Cache", 4096)],
        ),
    ],
)  # fmt: skip
async def test_loading_follows_the_options(
    calls: list[tuple[Any, ...]], model_dir: Path, options: dict[str, Any], expected: list[tuple[Any, ...]]
) -> None:
    backend = await started(model_dir, **options)
    await backend.stop()
    assert calls == [*expected, ("unload",)]


# The GPU check's files


def test_gpu_check_scripts_parse(tmp_path: Path) -> None:
    py_compile.compile(str(GPU_CHECK / "check.py"), cfile=str(tmp_path / "check.pyc"), doraise=True)
    for script in ("run_check.sh", "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", str(GPU_CHECK / script)], check=True)


def test_wheel_list_pins_every_wheel() -> None:
    lines = [line.split("#")[0].strip() for line in (GPU_CHECK / "wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert "exllamav2==0.3.2" in pins
    names = [pin.split("==")[0].lower().replace("_", "-") for pin in pins]
    assert all(pin.count("==") == 1 for pin in pins)
    assert len(names) == len(set(names)), "one version of each wheel"
    assert {"litestar", "msgspec", "uvicorn", "structlog", "sqlalchemy", "aiosqlite", "openai"} <= set(names)
    assert not {"torch", "numpy", "transformers", "tokenizers"} & set(names), "already on the GPU machine"
