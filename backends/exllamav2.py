"""ExLlamaV2 on one or more NVIDIA GPUs (``pip install 'llama-gateway[gpu]'``: exllamav2 0.3.2).

Options (``options:`` of a model entry, all optional)::

    max_seq_len      longest sequence, prompt + completion (default: context_length; a multiple of 256)
    cache_mode       fp16 | q8 | q6 | q4: the K/V cache's precision (default fp16)
    gpu_split        [GB, GB, ...] of weights per GPU, in device order
    autosplit        fill GPUs in order, leaving reserve_vram_gb free (default when no gpu_split)
    tensor_parallel  split every layer across the GPUs (by gpu_split, else by free VRAM)
    reserve_vram_gb  GB left free per GPU (one number or one per GPU) by autosplit / tensor_parallel
    max_batch_size   sequences decoded together (default: max_concurrency; paged mode only)
    max_chunk_size   prompt tokens per forward pass while prefilling (default 2048; a multiple of 256)
    cache_size       tokens the K/V cache holds over all sequences (default max_seq_len × max_batch_size)
    paged            auto | true | false: paged attention with continuous batching, which needs
                     flash-attn >= 2.5.7 (auto: used when importable; else one sequence at a time)

exllamav2 and torch are imported by `ExLlamaV2Backend.start` only, so this module (option parsing,
sampler mapping, incremental detokenization) works on machines without them. One thread owns the
`ExLlamaV2DynamicGenerator`: the event loop hands it jobs and cancellations through a queue and
receives tokens through ``loop.call_soon_threadsafe``, so no forward pass ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import logging
import math
import os
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol

from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    FinishReason,
    GenerationFailed,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
)

logger = logging.getLogger(__name__)

CacheMode = Literal["fp16", "q8", "q6", "q4"]
CACHE_CLASSES: Mapping[str, str] = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
PAGE_SIZE = 256
"""exllamav2's cache page; cache sizes and prefill chunks are multiples of it."""
DEFAULT_CHUNK_SIZE = 2048
MAX_Q_SIZE = 8
"""Tokens per sequence per decode pass that the generator reserves room for (its default)."""
OPTION_NAMES = (
    "max_seq_len",
    "cache_mode",
    "gpu_split",
    "autosplit",
    "tensor_parallel",
    "reserve_vram_gb",
    "max_batch_size",
    "max_chunk_size",
    "cache_size",
    "paged",
)


class ModelEntry(Protocol):
    """What this backend reads from a model entry (the gateway's ``ModelConfig``)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str | None: ...
    @property
    def context_length(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ExLlamaV2Options:
    """A model entry's ``options``, checked."""

    max_seq_len: int
    cache_mode: CacheMode = "fp16"
    gpu_split: tuple[float, ...] | None = None
    autosplit: bool = True
    tensor_parallel: bool = False
    reserve_vram_gb: tuple[float, ...] | float | None = None
    max_batch_size: int = 1
    max_chunk_size: int = DEFAULT_CHUNK_SIZE
    cache_size: int = 0
    paged: bool | None = None
    """None: paged when flash-attn >= 2.5.7 is importable."""


def parse_options(config: ModelEntry) -> ExLlamaV2Options:
    """Check a model entry's exllamav2 options; raise `BackendUnavailable` naming the bad value."""
    raw = dict(config.options)

    def fail(reason: str) -> BackendUnavailable:
        return BackendUnavailable(f"model {config.name!r}: {reason}")

    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        known = ", ".join(OPTION_NAMES)
        raise fail(f"unknown exllamav2 option {unknown[0]!r} (known options: {known})")

    def integer(name: str, default: int, minimum: int) -> int:
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(f"exllamav2 option {name!r} must be an integer >= {minimum}, not {value!r}")
        return value

    def flag(name: str, default: bool) -> bool:
        value = raw.get(name, default)
        if not isinstance(value, bool):
            raise fail(f"exllamav2 option {name!r} must be true or false, not {value!r}")
        return value

    def gigabytes(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise fail(f"exllamav2 option {name!r} needs numbers of GB >= 0, not {value!r}")
        return float(value)

    max_seq_len = integer("max_seq_len", config.context_length, PAGE_SIZE)
    if max_seq_len % PAGE_SIZE:
        raise fail(f"exllamav2 option 'max_seq_len' must be a multiple of {PAGE_SIZE}, not {max_seq_len}")

    cache_mode = raw.get("cache_mode", "fp16")
    if cache_mode not in CACHE_CLASSES:
        modes = ", ".join(CACHE_CLASSES)
        raise fail(f"exllamav2 option 'cache_mode' must be one of {modes}, not {cache_mode!r}")

    gpu_split: tuple[float, ...] | None = None
    if raw.get("gpu_split") is not None:
        split = raw["gpu_split"]
        if not isinstance(split, list) or not split:
            raise fail(f"exllamav2 option 'gpu_split' must be a list of GB per GPU, not {split!r}")
        gpu_split = tuple(gigabytes("gpu_split", v) for v in split)
        if not any(gpu_split):
            raise fail("exllamav2 option 'gpu_split' must give at least one GPU more than 0 GB")

    tensor_parallel = flag("tensor_parallel", False)
    autosplit = flag("autosplit", gpu_split is None and not tensor_parallel)
    if autosplit and gpu_split is not None:
        raise fail("exllamav2 options 'autosplit' and 'gpu_split' exclude each other; set one of them")
    if autosplit and tensor_parallel:
        raise fail("exllamav2 option 'tensor_parallel' splits by 'gpu_split' or free VRAM, not 'autosplit'")

    reserve: tuple[float, ...] | float | None = None
    if raw.get("reserve_vram_gb") is not None:
        value = raw["reserve_vram_gb"]
        if isinstance(value, list):
            if not value:
                raise fail("exllamav2 option 'reserve_vram_gb' must not be an empty list")
            reserve = tuple(gigabytes("reserve_vram_gb", v) for v in value)
        else:
            reserve = gigabytes("reserve_vram_gb", value)
        if gpu_split is not None:
            raise fail(
                "exllamav2 option 'reserve_vram_gb' applies to autosplit and to tensor_parallel without "
                "'gpu_split'; with 'gpu_split', give less GB per GPU instead"
            )

    max_chunk_size = integer("max_chunk_size", DEFAULT_CHUNK_SIZE, PAGE_SIZE)
    if max_chunk_size % PAGE_SIZE:
        raise fail(f"exllamav2 option 'max_chunk_size' must be a multiple of {PAGE_SIZE}, not {max_chunk_size}")

    max_batch_size = integer("max_batch_size", config.max_concurrency, 1)
    if max_batch_size * MAX_Q_SIZE > max(max_chunk_size, DEFAULT_CHUNK_SIZE):
        limit = max(max_chunk_size, DEFAULT_CHUNK_SIZE) // MAX_Q_SIZE
        raise fail(
            f"exllamav2 option 'max_batch_size' is {max_batch_size}, above the {limit} that "
            f"max_chunk_size {max_chunk_size} allows"
        )

    cache_size = integer("cache_size", max_seq_len * max_batch_size, max_seq_len)
    if cache_size % PAGE_SIZE:
        raise fail(f"exllamav2 option 'cache_size' must be a multiple of {PAGE_SIZE}, not {cache_size}")

    paged_raw = raw.get("paged", "auto")
    if paged_raw not in ("auto", True, False):
        raise fail(f"exllamav2 option 'paged' must be auto, true or false, not {paged_raw!r}")
    paged = None if paged_raw == "auto" else bool(paged_raw)

    return ExLlamaV2Options(
        max_seq_len=max_seq_len,
        cache_mode=cache_mode,
        gpu_split=gpu_split,
        autosplit=autosplit,
        tensor_parallel=tensor_parallel,
        reserve_vram_gb=reserve,
        max_batch_size=max_batch_size,
        max_chunk_size=max_chunk_size,
        cache_size=cache_size,
        paged=paged,
    )


def sampler_settings_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Every `ExLlamaV2Sampler.Settings` field that shapes the distribution, set from the request.

    exllamav2's defaults are not neutral (temperature 0.8, top_k 50, top_p 0.8, repetition
    penalty 1.025), so nothing is left to them. ``temperature == 0`` is greedy: top_k 1 after the
    penalties and the logit bias, as the OpenAI API defines it. exllamav2 applies the repetition,
    presence and frequency penalties over the whole sequence, prompt included.
    """
    greedy = sampling.temperature <= 0.0
    return {
        "temperature": 1.0 if greedy else sampling.temperature,
        "top_k": 1 if greedy else sampling.top_k,
        "top_p": 1.0 if greedy else sampling.top_p,
        "min_p": 0.0 if greedy else sampling.min_p,
        "token_repetition_penalty": sampling.repetition_penalty,
        "token_repetition_range": -1,
        "token_repetition_decay": 0,
        "token_presence_penalty": sampling.presence_penalty,
        "token_frequency_penalty": sampling.frequency_penalty,
        # Samplers the OpenAI API has no name for, switched off.
        "top_a": 0.0,
        "tfs": 0.0,
        "typical": 0.0,
        "skew": 0.0,
        "smoothing_factor": 0.0,
        "min_temp": 0.0,
        "max_temp": 0.0,
        "temp_exponent": 1.0,
        "temperature_last": False,
        "mirostat": False,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "cfg_scale": None,
        "token_bias": None,
    }


def logit_bias_entries(sampling: SamplingParams, vocab_size: int) -> list[tuple[int, float]]:
    """The request's logit bias as (token id, bias) pairs, every id inside the vocabulary."""
    entries = sorted((int(token), float(bias)) for token, bias in sampling.logit_bias.items())
    for token, bias in entries:
        if not 0 <= token < vocab_size:
            raise GenerationFailed(f"logit_bias names token {token}, outside the vocabulary of {vocab_size}")
        if not math.isfinite(bias):
            raise GenerationFailed(f"logit_bias for token {token} must be a finite number, not {bias}")
    return entries


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    The deltas concatenate to ``decode(all ids)``, however tokens split multi-byte characters
    or a tokenizer strips the leading space: each step decodes a short window twice (with and
    without the new ids) and emits the difference, holding text back while it ends in an
    incomplete character.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], context: Sequence[int] = ()) -> None:
        # ``context`` (the prompt's last token, for a continuation) is decoded along but never
        # emitted, so the first new token keeps the leading space it has after that context.
        self._decode = decode
        self._ids: list[int] = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


def paged_attention_available() -> bool:
    """Whether exllamav2 will find flash-attn >= 2.5.7, judged without importing anything."""
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = [int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit()]
    return numbers >= [2, 5, 7]


def check_model_dir(config: ModelEntry) -> Path:
    """The model directory, once it has what exllamav2 0.3.2 loads (config.json, tokenizer.json)."""
    if not config.path:
        raise BackendUnavailable(f"model {config.name!r}: the exllamav2 backend needs 'path' (a model directory)")
    model_dir = Path(config.path)
    if not model_dir.is_dir():
        raise BackendUnavailable(f"model {config.name!r}: {model_dir} is not a model directory")
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise BackendUnavailable(f"model {config.name!r}: the model directory {model_dir} has no {name}")
    return model_dir


def import_engine(model_name: str) -> SimpleNamespace:
    """Import torch and exllamav2, or say in one sentence why this machine cannot run them.

    The first import of exllamav2 compiles its CUDA extension (minutes; needs nvcc and ninja).
    """
    prefix = f"model {model_name!r}: the exllamav2 backend"
    if importlib.util.find_spec("exllamav2") is None:
        raise BackendUnavailable(
            f"{prefix} needs the exllamav2 package, which is not installed (pip install 'llama-gateway[gpu]')"
        )
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailable(f"{prefix} needs PyTorch with CUDA, which is not installed")
    torch = importlib.import_module("torch")
    if torch.version.cuda is None:
        raise BackendUnavailable(f"{prefix} needs PyTorch with CUDA, but PyTorch {torch.__version__} has none")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendUnavailable(f"{prefix} needs an NVIDIA GPU, and none is visible to CUDA")
    logger.info("importing exllamav2 (its first import compiles the CUDA extension, which takes minutes)")
    try:
        exllamav2 = importlib.import_module("exllamav2")
        generator = importlib.import_module("exllamav2.generator")
        attn = importlib.import_module("exllamav2.attn")
    except Exception as exc:
        raise BackendUnavailable(f"{prefix} could not import exllamav2: {_first_line(exc)}") from exc
    return SimpleNamespace(
        torch=torch,
        exllamav2=exllamav2,
        Generator=generator.ExLlamaV2DynamicGenerator,
        Job=generator.ExLlamaV2DynamicJob,
        Settings=generator.ExLlamaV2Sampler.Settings,
        has_paged_attention=bool(attn.has_flash_attn_with_paged),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


# Messages between the event loop and the generator thread.


@dataclass(frozen=True, slots=True)
class _Tokens:
    token_ids: tuple[int, ...]
    """Tokens exllamav2 released for the text (it holds some back, e.g. an incomplete character)."""
    finish_reason: FinishReason | None = None
    generated: int = 0
    """Tokens sampled since the previous event, released or held: what the request is billed."""


@dataclass(frozen=True, slots=True)
class _Failure:
    message: str


_Event = _Tokens | _Failure


@dataclass(slots=True)
class _Request:
    key: int
    request: GenerationRequest
    logit_bias: list[tuple[int, float]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event]
    job: Any = None
    counted: int = 0
    """Sampled tokens already reported, from the job's own count (held tokens included)."""


@dataclass(frozen=True, slots=True)
class _Cancel:
    key: int


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Command = _Request | _Cancel | _Stop


def _deliver(batch: list[tuple[asyncio.Queue[_Event], _Event]]) -> None:
    for events, event in batch:
        events.put_nowait(event)


@dataclass(slots=True)
class _Loaded:
    paged: bool
    max_batch_size: int
    vocab_size: int
    eos_token_id: int
    devices: list[str] = field(default_factory=list)


class _GeneratorThread:
    """Owns the model, cache and generator; the only thread that touches them."""

    def __init__(self, engine: SimpleNamespace, model_dir: Path, options: ExLlamaV2Options, name: str) -> None:
        self._engine = engine
        self._model_dir = model_dir
        self._options = options
        self._name = name
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._ready: concurrent.futures.Future[_Loaded] = concurrent.futures.Future()
        self._keys = itertools.count()
        self._active: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._run, name=f"exllamav2-{name}", daemon=True)
        self._model: Any = None
        self._generator: Any = None

    async def start(self) -> _Loaded:
        self._thread.start()
        return await asyncio.wrap_future(self._ready)

    def request_stop(self) -> None:
        """Stop serving and unload, once loading (if still under way) has finished."""
        self._commands.put(_Stop())

    async def stop(self) -> None:
        self.request_stop()
        await asyncio.to_thread(self._thread.join)

    def submit(
        self, request: GenerationRequest, logit_bias: list[tuple[int, float]], events: asyncio.Queue[_Event]
    ) -> int:
        if not self._thread.is_alive():
            raise GenerationFailed("the exllamav2 generator thread has stopped")
        key = next(self._keys)
        self._commands.put(_Request(key, request, logit_bias, asyncio.get_running_loop(), events))
        return key

    def cancel(self, key: int) -> None:
        self._commands.put(_Cancel(key))

    # Generator thread from here on.

    def _run(self) -> None:
        try:
            loaded = self._load()
        except BaseException as exc:
            self._unload()
            self._ready.set_exception(exc)
            return
        self._ready.set_result(loaded)
        try:
            self._serve(loaded)
        except BaseException as exc:
            logger.exception("the exllamav2 generator thread failed")
            self._fail_all(f"the engine failed: {_first_line(exc)}")
        finally:
            self._fail_waiting()
            self._unload()

    def _unload(self) -> None:
        model, self._generator, self._model = self._model, None, None
        try:
            if model is not None:
                model.unload()
            self._engine.torch.cuda.empty_cache()
        except Exception:
            logger.exception("unloading the exllamav2 model failed")

    def _load(self) -> _Loaded:
        e, o = self._engine, self._options
        exl, torch = e.exllamav2, e.torch
        config = exl.ExLlamaV2Config(str(self._model_dir))
        config.arch_compat_overrides(quiet=True)
        config.max_seq_len = o.max_seq_len
        config.max_input_len = max(o.max_chunk_size, DEFAULT_CHUNK_SIZE)
        config.max_attention_size = config.max_input_len**2

        paged = (e.has_paged_attention and not config.no_flash_attn) if o.paged is None else o.paged
        if paged and not e.has_paged_attention:
            raise BackendUnavailable("paged: true needs flash-attn >= 2.5.7, which is not importable")
        batch_size = o.max_batch_size if paged else 1
        cache_tokens = o.cache_size if paged else o.max_seq_len
        cache_class = getattr(exl, CACHE_CLASSES[o.cache_mode])

        model = exl.ExLlamaV2(config)
        self._model = model
        if o.tensor_parallel:
            split = list(o.gpu_split) if o.gpu_split else self._free_vram_split(torch)
            model.load_tp(gpu_split=split, expect_cache_tokens=cache_tokens, expect_cache_base=cache_class)
            cache = exl.ExLlamaV2Cache_TP(model, base=cache_class, max_seq_len=cache_tokens)
        elif o.autosplit:
            cache = cache_class(model, max_seq_len=cache_tokens, lazy=True)
            model.load_autosplit(cache, reserve_vram=self._reserve_bytes())
        else:
            model.load(gpu_split=list(o.gpu_split) if o.gpu_split else None)
            cache = cache_class(model, max_seq_len=cache_tokens)

        tokenizer = exl.ExLlamaV2Tokenizer(config)
        generator = e.Generator(
            model=model,
            cache=cache,
            tokenizer=tokenizer,
            max_batch_size=batch_size,
            max_seq_len=o.max_seq_len,
            max_chunk_size=o.max_chunk_size,
            paged=paged,
        )
        generator.warmup()
        self._generator = generator
        devices = sorted({str(p.device) for p in _cache_tensors(cache)})
        return _Loaded(
            paged=paged,
            max_batch_size=batch_size,
            vocab_size=int(config.vocab_size),
            eos_token_id=int(tokenizer.eos_token_id),
            devices=devices,
        )

    def _reserve_bytes(self) -> list[int] | int | None:
        reserve = self._options.reserve_vram_gb
        if reserve is None:
            return None
        if isinstance(reserve, tuple):
            # exllamav2 reads one entry per visible GPU.
            missing = max(0, self._engine.torch.cuda.device_count() - len(reserve))
            return [int(gb * 1024**3) for gb in reserve] + [0] * missing
        return int(reserve * 1024**3)

    def _free_vram_split(self, torch: Any) -> list[float] | None:
        reserve = self._options.reserve_vram_gb
        if reserve is None:
            return None
        count = torch.cuda.device_count()
        per_device = list(reserve) if isinstance(reserve, tuple) else [reserve] * count
        per_device += [0.0] * (count - len(per_device))
        return [max(0.0, torch.cuda.mem_get_info(i)[0] / 1024**3 - per_device[i]) for i in range(count)]

    def _serve(self, loaded: _Loaded) -> None:
        generator = self._generator
        while True:
            idle = generator.num_remaining_jobs() == 0
            command: _Command | None = self._commands.get() if idle else self._next_command()
            while command is not None:
                if isinstance(command, _Stop):
                    self._fail_all("the model was stopped")
                    return
                self._apply(command, loaded)
                command = self._next_command()
            if generator.num_remaining_jobs() == 0:
                continue
            try:
                results = generator.iterate()
            except Exception as exc:
                logger.exception("exllamav2 failed; failing its %d active requests", len(self._active))
                self._fail_all(f"the engine failed: {_first_line(exc)}")
                continue
            self._dispatch(results, loaded)

    def _next_command(self) -> _Command | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: _Request | _Cancel, loaded: _Loaded) -> None:
        if isinstance(command, _Cancel):
            cancelled = self._active.pop(command.key, None)
            if cancelled is not None and cancelled.job is not None:
                self._generator.cancel(cancelled.job)
            return
        try:
            command.job = self._make_job(command, loaded)
            self._generator.enqueue(command.job)
        except Exception as exc:
            refusal = _Failure(f"the engine refused the request: {_first_line(exc)}")
            _post(command.loop, [(command.events, refusal)])
            return
        self._active[command.key] = command

    def _make_job(self, command: _Request, loaded: _Loaded) -> Any:
        e, sampling = self._engine, command.request.sampling
        settings = e.Settings(**sampler_settings_kwargs(sampling))
        if command.logit_bias:
            # Added to the logits row, which the generator pads to a multiple of 32.
            token_bias = e.torch.zeros((-(-loaded.vocab_size // 32) * 32,), dtype=e.torch.float)
            for token, value in command.logit_bias:
                token_bias[token] = value
            settings.token_bias = token_bias
        return e.Job(
            input_ids=e.torch.tensor([list(command.request.prompt_ids)], dtype=e.torch.long),
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens,
            gen_settings=settings,
            seed=sampling.seed,
            stop_conditions=[loaded.eos_token_id],
            decode_special_tokens=False,
            identifier=command.key,
        )

    def _dispatch(self, results: list[dict[str, Any]], loaded: _Loaded) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[_Event], _Event]]] = {}
        for result in results:
            if result.get("stage") != "streaming":
                continue
            request = self._active.get(result.get("identifier", -1))
            if request is None:
                continue
            token_ids = _ids(result.get("token_ids"))
            finish: FinishReason | None = None
            # exllamav2 holds tokens back while their text is incomplete (a character split over
            # byte tokens), possibly for long; the job's own count says what was sampled meanwhile.
            sampled = int(request.job.new_tokens)
            if result.get("eos"):
                del self._active[request.key]
                # On a stop token nothing is emitted: tokens held back for an incomplete
                # character come under "held", followed by the stop token itself.
                token_ids += _ids(result.get("held", {}).get("token_ids"))
                reason = result.get("eos_reason")
                if reason == "stop_token" and token_ids and token_ids[-1] == loaded.eos_token_id:
                    token_ids.pop()
                    sampled -= 1  # EOS is never counted
                finish = "length" if reason == "max_new_tokens" else "stop"
            generated = max(0, sampled - request.counted)
            request.counted += generated
            if not token_ids and not generated and finish is None:
                continue
            event = _Tokens(tuple(token_ids), finish, generated)
            batches.setdefault(request.loop, []).append((request.events, event))
        for loop, batch in batches.items():
            _post(loop, batch)

    def _fail_waiting(self) -> None:
        """Answer requests submitted while the thread was stopping."""
        while (command := self._next_command()) is not None:
            if isinstance(command, _Request):
                _post(command.loop, [(command.events, _Failure("the model was stopped"))])

    def _fail_all(self, message: str) -> None:
        active, self._active = self._active, {}
        for request in active.values():
            _post(request.loop, [(request.events, _Failure(message))])
        if self._generator is not None:
            try:
                self._generator.clear_queue()
            except Exception:
                logger.exception("clearing exllamav2's job queue failed")


def _ids(tensor: Any) -> list[int]:
    return [] if tensor is None else [int(t) for t in tensor.flatten().tolist()]


def _cache_tensors(cache: Any) -> list[Any]:
    try:
        return list(cache.all_tensors())
    except Exception:
        return []


def _post(loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue[_Event], _Event]]) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_deliver, batch)


class ExLlamaV2Backend:
    """A model directory (EXL2 or FP16 safetensors) served by exllamav2's dynamic generator."""

    def __init__(self, config: ModelEntry) -> None:
        self._config = config
        self._options = parse_options(config)
        self._thread: _GeneratorThread | None = None
        self._loaded: _Loaded | None = None
        self._decode: Callable[[Sequence[int]], str] | None = None
        paged = paged_attention_available() if self._options.paged is None else self._options.paged
        self._capabilities = BackendCapabilities(
            max_concurrency=self._options.max_batch_size if paged else 1,
            context_length=min(config.context_length, self._options.max_seq_len),
        )

    @property
    def options(self) -> ExLlamaV2Options:
        return self._options

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    def preflight(self) -> None:
        """Fail before serving, with one sentence, when this machine cannot run the model."""
        check_model_dir(self._config)
        import_engine(self._config.name)

    async def start(self) -> None:
        if self._thread is not None:
            return
        model_dir = check_model_dir(self._config)
        engine = await asyncio.to_thread(import_engine, self._config.name)
        tokenizers = importlib.import_module("tokenizers")
        hf_tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))

        def decode(ids: Sequence[int]) -> str:
            return str(hf_tokenizer.decode(list(ids), skip_special_tokens=True))

        thread = _GeneratorThread(engine, model_dir, self._options, self._config.name)
        try:
            loaded = await thread.start()
        except asyncio.CancelledError:
            thread.request_stop()
            raise
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"model {self._config.name!r}: {exc}") from None
        except Exception as exc:
            raise BackendUnavailable(
                f"model {self._config.name!r}: exllamav2 could not load {model_dir}: {_first_line(exc)}"
            ) from exc
        self._thread, self._loaded, self._decode = thread, loaded, decode
        self._capabilities = BackendCapabilities(
            max_concurrency=loaded.max_batch_size,
            context_length=min(self._config.context_length, self._options.max_seq_len),
        )
        if loaded.paged:
            logger.info(
                "exllamav2 model %s on %s: paged attention, continuous batching of up to %d sequences",
                self._config.name,
                ", ".join(loaded.devices) or "GPU",
                loaded.max_batch_size,
            )
        else:
            logger.info(
                "exllamav2 model %s on %s: unpaged mode, one sequence at a time (paged batching needs "
                "flash-attn >= 2.5.7)",
                self._config.name,
                ", ".join(loaded.devices) or "GPU",
            )

    async def stop(self) -> None:
        thread, self._thread, self._loaded = self._thread, None, None
        if thread is not None:
            await thread.stop()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        thread, loaded, decode = self._thread, self._loaded, self._decode
        if thread is None or loaded is None or decode is None:
            raise BackendUnavailable(f"model {self._config.name!r} is not started")
        sampling = request.sampling
        if not request.prompt_ids:
            raise GenerationFailed("the prompt has no tokens")
        if sampling.max_tokens < 1:
            raise GenerationFailed(f"max_tokens must be at least 1, not {sampling.max_tokens}")
        if len(request.prompt_ids) + sampling.max_tokens > self._options.max_seq_len:
            raise GenerationFailed(
                f"{len(request.prompt_ids)} prompt tokens + {sampling.max_tokens} new tokens exceed "
                f"max_seq_len {self._options.max_seq_len}"
            )
        logit_bias = logit_bias_entries(sampling, loaded.vocab_size)
        events: asyncio.Queue[_Event] = asyncio.Queue()
        key = thread.submit(request, logit_bias, events)
        text = IncrementalDetokenizer(decode, request.prompt_ids[-1:] if request.continuation else ())
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, _Failure):
                    finished = True
                    raise GenerationFailed(event.message)
                delta = text.push(event.token_ids)
                if event.finish_reason is not None:
                    finished = True
                    yield TokenDelta(
                        delta + text.flush(), event.token_ids, event.finish_reason, token_count=event.generated
                    )
                    return
                yield TokenDelta(delta, event.token_ids, token_count=event.generated)
        finally:
            if not finished:
                thread.cancel(key)
