"""llama.cpp on the CPU, through llama-cpp-python.

Each slot is one ``Llama`` context with a dedicated worker thread, so a forward pass never
runs on the event loop. The sampler chain is built here, per request, with every setting
explicit, rather than through ``Llama.generate`` whose defaults (top_k 40, min_p 0.05, ...)
are not neutral and whose Python logits-processor hook cannot express ``min_tokens``.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import logging
import random
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
    WeightsProgress,
)
from backends.config import BackendConfig, WeightsFormat
from backends.llamacpp.log_routing import route_llama_cpp_logs
from backends.llamacpp.weights import ConversionError, ensure_converted, sha256_of

logger = logging.getLogger(__name__)

_FORMATS: tuple[str, ...] = get_args(WeightsFormat)

# Penalties look back over this many tokens, as llama.cpp's own server does by default.
PENALTY_LAST_N = 64
_NEG_INF = float("-inf")
_PIECE_BUFFER_SIZE = 256


@dataclass(frozen=True, slots=True)
class LlamaCppOptions:
    n_ctx: int
    n_threads: int | None
    n_batch: int
    compute_format: WeightsFormat = "stored"
    sha256: str | None = None
    """The GGUF's expected SHA-256, checked before it is converted."""

    @classmethod
    def from_config(cls, config: BackendConfig) -> LlamaCppOptions:
        options = dict(config.options)
        unknown = set(options) - {"n_ctx", "n_threads", "n_batch", "compute_format", "sha256"}
        if unknown:
            raise BackendUnavailable(f"model {config.name!r}: unknown llamacpp option(s) {', '.join(sorted(unknown))}")
        compute_format = options.get("compute_format", "stored")
        if compute_format not in _FORMATS:
            raise BackendUnavailable(
                f"model {config.name!r}: compute_format must be one of {', '.join(_FORMATS)}, not {compute_format!r}"
            )
        return cls(
            n_ctx=int(options.get("n_ctx", config.context_length)),
            n_threads=int(options["n_threads"]) if "n_threads" in options else None,
            n_batch=int(options.get("n_batch", 512)),
            compute_format=compute_format,
            sha256=str(options["sha256"]).lower() if options.get("sha256") else None,
        )


class _Slot:
    """One llama.cpp context and the thread that runs it."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.lock = threading.Lock()


class LlamaCppBackend:
    """A GGUF model served by llama.cpp, ``max_concurrency`` contexts side by side."""

    def __init__(self, config: BackendConfig, *, weights_dir: Path | None = None) -> None:
        """``weights_dir`` caches converted weights (needed when ``compute_format`` is not ``stored``)."""
        self._config = config
        self._options = LlamaCppOptions.from_config(config)
        self._weights_dir = weights_dir
        self._slots: asyncio.Queue[_Slot] | None = None
        self._all_slots: list[_Slot] = []
        self._capabilities = BackendCapabilities(
            max_concurrency=config.max_concurrency,
            context_length=min(config.context_length, self._options.n_ctx),
        )

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    def preflight(self) -> None:
        """Fail before serving, with one sentence, when the model cannot be loaded here."""
        if importlib.util.find_spec("llama_cpp") is None:
            raise BackendUnavailable(f"model {self._config.name!r}: llama-cpp-python is not installed")
        if not self._config.path or not Path(self._config.path).is_file():
            raise BackendUnavailable(
                f"model {self._config.name!r}: GGUF file {self._config.path} does not exist; fix its 'path'"
            )
        if self._options.compute_format != "stored" and self._weights_dir is None:
            raise BackendUnavailable(f"model {self._config.name!r}: compute_format needs a weights directory")

    def prepare_weights(self, progress: WeightsProgress | None = None) -> Path:
        """The GGUF file to load: the configured one, or its conversion (made now if not cached).

        Blocking; a first conversion of the embedded model takes a few seconds.
        """
        self.preflight()
        source = Path(str(self._config.path))
        fmt = self._options.compute_format
        if fmt == "stored" or self._weights_dir is None:
            if self._options.sha256 is not None and sha256_of(source) != self._options.sha256:
                raise BackendUnavailable(
                    f"model {self._config.name!r}: {source} does not have the SHA-256 its 'sha256' option names"
                )
            return source
        try:
            weights = ensure_converted(
                source, fmt, self._weights_dir, expected_sha256=self._options.sha256, progress=progress
            )
        except ConversionError as exc:
            raise BackendUnavailable(f"model {self._config.name!r}: {exc}") from exc
        if weights.converted:
            message = "converted %s to %s for llama.cpp in %.1f s: %s"
            logger.info(message, source.name, fmt.upper(), weights.seconds, weights.path)
        return weights.path

    async def start(self) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendUnavailable("llama-cpp-python is not installed") from exc
        route_llama_cpp_logs()
        path = str(await asyncio.to_thread(self.prepare_weights))

        def load() -> Any:
            try:
                return Llama(
                    model_path=path,
                    n_ctx=self._options.n_ctx,
                    n_batch=self._options.n_batch,
                    n_threads=self._options.n_threads,
                    verbose=False,
                )
            except (ValueError, RuntimeError) as exc:
                raise BackendUnavailable(f"llama.cpp could not load {path}: {exc}") from exc

        self._slots = asyncio.Queue()
        for _ in range(self._config.max_concurrency):
            slot = _Slot(await asyncio.to_thread(load))
            self._all_slots.append(slot)
            self._slots.put_nowait(slot)

    async def stop(self) -> None:
        for slot in self._all_slots:
            with slot.lock:
                slot.llama.close()
        self._all_slots.clear()
        self._slots = None

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta]:
        if self._slots is None:
            raise BackendUnavailable(f"model {self._config.name!r} is not loaded")
        slot = await self._slots.get()
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: TokenDelta | BaseException) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, item)

        def run() -> None:
            with slot.lock:
                try:
                    _generate_blocking(slot.llama, request, cancelled.is_set, emit)
                except Exception as exc:  # reported to the awaiting coroutine, never lost
                    emit(GenerationFailed(f"llama.cpp failed: {exc}"))

        slots = self._slots
        worker = loop.run_in_executor(None, run)
        # The slot goes back once the thread has left it (it checks the flag after every
        # token). Done without awaiting: cleanup may run inside an already-cancelled task.
        worker.add_done_callback(lambda _: slots.put_nowait(slot))
        try:
            while True:
                item = await deltas.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            cancelled.set()


def _build_sampler(llama: Any, sampling: SamplingParams, seed: int, ban_eos: bool) -> Any:
    from llama_cpp import _internals

    sampler = _internals.LlamaSampler()
    n_vocab = llama.n_vocab()
    bias = {int(token): float(value) for token, value in sampling.logit_bias.items()}
    if ban_eos:
        bias[llama.token_eos()] = _NEG_INF
    if bias:
        sampler.add_logit_bias(n_vocab, bias)
    sampler.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=PENALTY_LAST_N,
        penalty_repeat=sampling.repetition_penalty,
        penalty_freq=sampling.frequency_penalty,
        penalty_present=sampling.presence_penalty,
    )
    if sampling.temperature == 0:
        sampler.add_greedy()
        return sampler
    if sampling.top_k > 0:
        sampler.add_top_k(sampling.top_k)
    if sampling.top_p < 1:
        sampler.add_top_p(sampling.top_p, 1)
    if sampling.min_p > 0:
        sampler.add_min_p(sampling.min_p, 1)
    sampler.add_temp(sampling.temperature)
    sampler.add_dist(seed)
    return sampler


def _reuse_prefix(llama: Any, prompt: Sequence[int]) -> list[int]:
    """Keep the KV cache for the prompt's longest cached prefix; return what is left to evaluate."""
    cached = llama.n_tokens
    common = 0
    limit = min(cached, len(prompt) - 1)  # at least one token is evaluated to refresh the logits
    input_ids = llama.input_ids
    while common < limit and input_ids[common] == prompt[common]:
        common += 1
    if common and llama._ctx.kv_cache_seq_rm(-1, common, -1):
        llama.n_tokens = common
        return list(prompt[common:])
    llama.reset()
    return list(prompt)


def _token_bytes(lib: Any, vocab: Any, token: int, buffer: ctypes.Array[ctypes.c_char]) -> bytes:
    """The raw bytes of one token's piece (it may hold part of a UTF-8 character)."""
    n = lib.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    if n < 0:
        raise GenerationFailed(f"token {token} does not fit a {len(buffer)}-byte piece buffer")
    return buffer.raw[:n]


def _generate_blocking(
    llama: Any,
    request: GenerationRequest,
    is_cancelled: Callable[[], bool],
    emit: Callable[[TokenDelta | BaseException], None],
) -> None:
    from llama_cpp import llama_cpp as lib

    sampling = request.sampling
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    eos = llama.token_eos()
    # SentencePiece vocabularies put a space before the first word; Meta's reference decode
    # drops it from the reply, and so do we.
    strip_first_space = (
        not request.continuation and lib.llama_vocab_type(llama._model.vocab) == lib.LLAMA_VOCAB_TYPE_SPM
    )
    eos_ban = _build_sampler(llama, sampling, seed, ban_eos=True) if sampling.min_tokens > 0 else None
    sampler = _build_sampler(llama, sampling, seed, ban_eos=False)
    # Penalties see the prompt's last tokens too, as llama.cpp's server, vLLM and HF apply them.
    for token in request.prompt_ids[-PENALTY_LAST_N:]:
        sampler.accept(token)
        if eos_ban is not None:
            eos_ban.accept(token)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    piece_buffer = ctypes.create_string_buffer(_PIECE_BUFFER_SIZE)
    pending_ids: list[int] = []
    produced = 0
    started_text = False
    to_eval = _reuse_prefix(llama, request.prompt_ids)
    try:
        while True:
            if is_cancelled():
                return
            llama.eval(to_eval)
            active = eos_ban if eos_ban is not None and produced < sampling.min_tokens else sampler
            token = active.sample(llama._ctx, -1)
            other = sampler if active is eos_ban else eos_ban
            if other is not None:
                other.accept(token)
            if token == eos or lib.llama_vocab_is_eog(llama._model.vocab, token):
                emit(TokenDelta(decoder.decode(b"", final=True), tuple(pending_ids), "stop"))
                return
            produced += 1
            pending_ids.append(token)
            text = decoder.decode(_token_bytes(lib, llama._model.vocab, token, piece_buffer))
            if not started_text and text:
                if strip_first_space and text.startswith(" "):
                    text = text[1:]
                started_text = True
            finished = produced >= sampling.max_tokens or llama.n_tokens + 1 >= llama.n_ctx()
            if finished:
                text += decoder.decode(b"", final=True)
            if text or finished:
                emit(TokenDelta(text, tuple(pending_ids), "length" if finished else None))
                pending_ids = []
            if finished:
                return
            to_eval = [token]
    finally:
        sampler.close()
        if eos_ban is not None:
            eos_ban.close()
