"""llama.cpp on the CPU, through llama-cpp-python.

Each slot is one ``Llama`` context with a dedicated worker thread, so a forward pass never
runs on the event loop. Modules, each importing only those below it::

    backend         `LlamaCppBackend`: options, slots, the stream of deltas
    generation      one generation on one context: sampler chain, prefix reuse, the token loop
    grammar         constraints: llguidance's token mask written into the logits
    prompt_scoring  a prompt's own log-probabilities, read chunk by chunk
    logprobs        log-probabilities and alternatives from a row of logits
    pieces          a token's bytes
    weights         the GGUF in another compute format, converted once
    log_routing     llama.cpp's log lines into Python logging
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    TokenDelta,
    WeightsProgress,
)
from backends.config import BackendConfig, WeightsFormat
from backends.llamacpp.generation import generate_blocking
from backends.llamacpp.grammar import GrammarTokenizer
from backends.llamacpp.log_routing import route_llama_cpp_logs
from backends.llamacpp.weights import ConversionError, ensure_converted, sha256_of

logger = logging.getLogger(__name__)

_FORMATS: tuple[str, ...] = get_args(WeightsFormat)


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
        self._grammar_tokenizer = GrammarTokenizer()
        self._capabilities = BackendCapabilities(
            max_concurrency=config.max_concurrency,
            context_length=min(config.context_length, self._options.n_ctx),
            supports_constraints=True,
            supports_logprobs=True,
            supports_prompt_logprobs=True,
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
        loading = time.monotonic()
        for _ in range(self._config.max_concurrency):
            slot = _Slot(await asyncio.to_thread(load))
            self._all_slots.append(slot)
            self._slots.put_nowait(slot)
        logger.info(
            "llama.cpp loaded model %s in %.1f s: %s, n_ctx %d, %d slot(s), %s threads",
            self._config.name,
            time.monotonic() - loading,
            path,
            self._options.n_ctx,
            self._config.max_concurrency,
            self._options.n_threads if self._options.n_threads is not None else "default",
        )

    async def stop(self) -> None:
        # Every slot is held before any model closes: the grammar tokenizer reads one of them.
        with contextlib.ExitStack() as held:
            for slot in self._all_slots:
                held.enter_context(slot.lock)
            self._grammar_tokenizer.clear()
            for slot in self._all_slots:
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
                    generate_blocking(slot.llama, request, self._grammar_tokenizer, cancelled.is_set, emit)
                except GenerationFailed as exc:  # already says what failed (a grammar, say)
                    emit(exc)
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
