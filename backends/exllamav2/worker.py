"""The generator thread: the only thread that touches exllamav2's model, cache and generator.

The event loop hands it jobs and cancellations through a queue and receives tokens through
``loop.call_soon_threadsafe``, so no forward pass ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backends.base import BackendUnavailable, FinishReason, GenerationFailed, GenerationRequest, GrammarRejected
from backends.exllamav2.engine import first_line
from backends.exllamav2.guidance import grammar_tokenizer, guide_for, guided_filter_class
from backends.exllamav2.messages import Cancel, Command, Event, Failure, JobRequest, Loaded, Stop, Tokens, deliver
from backends.exllamav2.options import CACHE_CLASSES, DEFAULT_CHUNK_SIZE, ExLlamaV2Options
from backends.exllamav2.sampling import sampler_settings_kwargs

logger = logging.getLogger(__name__)


class GeneratorThread:
    """Owns the model, cache and generator; the only thread that touches them."""

    def __init__(self, engine: SimpleNamespace, model_dir: Path, options: ExLlamaV2Options, name: str) -> None:
        self._engine = engine
        self._model_dir = model_dir
        self._options = options
        self._name = name
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._ready: concurrent.futures.Future[Loaded] = concurrent.futures.Future()
        self._keys = itertools.count()
        self._active: dict[int, JobRequest] = {}
        self._thread = threading.Thread(target=self._run, name=f"exllamav2-{name}", daemon=True)
        self._model: Any = None
        self._tokenizer: Any = None
        self._generator: Any = None
        self._filter_class: type | None = None

    async def start(self) -> Loaded:
        self._thread.start()
        return await asyncio.wrap_future(self._ready)

    def request_stop(self) -> None:
        """Stop serving and unload, once loading (if still under way) has finished."""
        self._commands.put(Stop())

    async def stop(self) -> None:
        self.request_stop()
        await asyncio.to_thread(self._thread.join)

    def submit(
        self, request: GenerationRequest, logit_bias: list[tuple[int, float]], events: asyncio.Queue[Event]
    ) -> int:
        if not self._thread.is_alive():
            raise GenerationFailed("the exllamav2 generator thread has stopped")
        key = next(self._keys)
        self._commands.put(JobRequest(key, request, logit_bias, asyncio.get_running_loop(), events))
        return key

    def cancel(self, key: int) -> None:
        self._commands.put(Cancel(key))

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
            self._fail_all(f"the engine failed: {first_line(exc)}")
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

    def _load(self) -> Loaded:
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
        self._generator, self._tokenizer = generator, tokenizer
        self._filter_class = guided_filter_class(e.Filter)
        devices = sorted({str(p.device) for p in _cache_tensors(cache)})
        vocab_size, eos = int(config.vocab_size), int(tokenizer.eos_token_id)
        return Loaded(
            paged=paged,
            max_batch_size=batch_size,
            vocab_size=vocab_size,
            eos_token_id=eos,
            devices=devices,
            grammar_tokenizer=self._grammar_tokenizer(vocab_size, eos),
        )

    def _grammar_tokenizer(self, vocab_size: int, eos: int) -> Any:
        try:
            return grammar_tokenizer(self._model_dir / "tokenizer.json", vocab_size, eos)
        except Exception as exc:  # the model still serves requests without constraints or logprobs
            logger.warning("model %s: llguidance cannot read its tokenizer.json (%s)", self._name, first_line(exc))
            return None

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

    def _serve(self, loaded: Loaded) -> None:
        generator = self._generator
        while True:
            idle = generator.num_remaining_jobs() == 0
            command: Command | None = self._commands.get() if idle else self._next_command()
            while command is not None:
                if isinstance(command, Stop):
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
                self._fail_all(f"the engine failed: {first_line(exc)}")
                continue
            self._dispatch(results, loaded)

    def _next_command(self) -> Command | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: JobRequest | Cancel, loaded: Loaded) -> None:
        if isinstance(command, Cancel):
            cancelled = self._active.pop(command.key, None)
            if cancelled is not None and cancelled.job is not None:
                self._generator.cancel(cancelled.job)
            return
        try:
            command.guide = guide_for(loaded.grammar_tokenizer, command.request)
            command.job = self._make_job(command, loaded)
            self._generator.enqueue(command.job)
        except GrammarRejected as exc:
            _post(command.loop, [(command.events, Failure(str(exc), grammar=True))])
            return
        except Exception as exc:
            refusal = Failure(f"the engine refused the request: {first_line(exc)}")
            _post(command.loop, [(command.events, refusal)])
            return
        self._active[command.key] = command

    def _make_job(self, command: JobRequest, loaded: Loaded) -> Any:
        e, sampling = self._engine, command.request.sampling
        settings = e.Settings(**sampler_settings_kwargs(sampling))
        if command.logit_bias:
            # Added to the logits row, which the generator pads to a multiple of 32.
            token_bias = e.torch.zeros((-(-loaded.vocab_size // 32) * 32,), dtype=e.torch.float)
            for token, value in command.logit_bias:
                token_bias[token] = value
            settings.token_bias = token_bias
        job_options: dict[str, Any] = {}
        if command.guide is not None and self._filter_class is not None:
            job_options["filters"] = [self._filter_class(self._model, self._tokenizer, command.guide)]
        return e.Job(
            input_ids=e.torch.tensor([list(command.request.prompt_ids)], dtype=e.torch.long),
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens,
            gen_settings=settings,
            seed=sampling.seed,
            stop_conditions=[loaded.eos_token_id],
            decode_special_tokens=False,
            identifier=command.key,
            **job_options,
        )

    def _dispatch(self, results: list[dict[str, Any]], loaded: Loaded) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Event], Event]]] = {}
        for result in results:
            if result.get("stage") != "streaming":
                continue
            request = self._active.get(result.get("identifier", -1))
            if request is None:
                continue
            # Every sampled token is read from the job's own sequence (the prompt, then each token
            # as it is sampled), not from the result's released ids: exllamav2 holds tokens back
            # while their text is an incomplete character, possibly for long. Text is decoded from
            # these ids by the backend, which holds back only the incomplete character's text.
            sampled = int(request.job.new_tokens)
            token_ids = _new_ids(request.job, sampled - request.counted)
            request.counted = sampled
            finish: FinishReason | None = None
            if result.get("eos"):
                del self._active[request.key]
                reason = result.get("eos_reason")
                if reason == "stop_token" and token_ids and token_ids[-1] == loaded.eos_token_id:
                    token_ids.pop()  # EOS is never a completion token
                finish = "length" if reason == "max_new_tokens" else "stop"
            if not token_ids and finish is None:
                continue
            # The guide recorded every sampled token in order, the stop token last: it is left over.
            logprobs = request.guide.take(len(token_ids)) if request.guide is not None else ()
            event = Tokens(tuple(token_ids), finish, logprobs)
            batches.setdefault(request.loop, []).append((request.events, event))
        for loop, batch in batches.items():
            _post(loop, batch)

    def _fail_waiting(self) -> None:
        """Answer requests submitted while the thread was stopping."""
        while (command := self._next_command()) is not None:
            if isinstance(command, JobRequest):
                _post(command.loop, [(command.events, Failure("the model was stopped"))])

    def _fail_all(self, message: str) -> None:
        active, self._active = self._active, {}
        for request in active.values():
            _post(request.loop, [(request.events, Failure(message))])
        if self._generator is not None:
            try:
                self._generator.clear_queue()
            except Exception:
                logger.exception("clearing exllamav2's job queue failed")


def _new_ids(job: Any, count: int) -> list[int]:
    """The job's last ``count`` sampled tokens, from its sequence (a `SeqTensor` of shape (1, n))."""
    if count <= 0:
        return []
    sequence = job.sequences[0].sequence_ids
    end = len(sequence)
    return [int(t) for t in sequence.torch_slice(end - count, end).flatten().tolist()]


def _cache_tensors(cache: Any) -> list[Any]:
    try:
        return list(cache.all_tensors())
    except Exception:
        return []


def _post(loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue[Event], Event]]) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(deliver, batch)
