"""`ExLlamaV2Backend`: the backend protocol over the generator thread."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence

import backends.exllamav2.engine as engine
from backends.base import (
    BackendCapabilities,
    BackendUnavailable,
    GenerationFailed,
    GenerationRequest,
    GrammarRejected,
    TokenDelta,
)
from backends.config import BackendConfig
from backends.exllamav2.detokenizer import IncrementalDetokenizer
from backends.exllamav2.messages import Event, Failure, Loaded
from backends.exllamav2.options import ExLlamaV2Options, parse_options
from backends.exllamav2.sampling import logit_bias_entries
from backends.exllamav2.worker import GeneratorThread

logger = logging.getLogger(__name__)


class ExLlamaV2Backend:
    """A model directory (EXL2 or FP16 safetensors) served by exllamav2's dynamic generator."""

    def __init__(self, config: BackendConfig) -> None:
        self._config = config
        self._options = parse_options(config)
        self._thread: GeneratorThread | None = None
        self._loaded: Loaded | None = None
        self._decode: Callable[[Sequence[int]], str] | None = None
        paged = engine.paged_attention_available() if self._options.paged is None else self._options.paged
        self._capabilities = BackendCapabilities(
            max_concurrency=self._options.max_batch_size if paged else 1,
            context_length=min(config.context_length, self._options.max_seq_len),
            supports_constraints=True,
            supports_logprobs=True,
        )

    @property
    def options(self) -> ExLlamaV2Options:
        return self._options

    @property
    def capabilities(self) -> BackendCapabilities:
        return self._capabilities

    def preflight(self) -> None:
        """Fail before serving, with one sentence, when this machine cannot run the model."""
        engine.check_model_dir(self._config)
        engine.import_engine(self._config.name)

    async def start(self) -> None:
        if self._thread is not None:
            return
        model_dir = engine.check_model_dir(self._config)
        modules = await asyncio.to_thread(engine.import_engine, self._config.name)
        tokenizers = importlib.import_module("tokenizers")
        hf_tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))

        def decode(ids: Sequence[int]) -> str:
            return str(hf_tokenizer.decode(list(ids), skip_special_tokens=True))

        thread = GeneratorThread(modules, model_dir, self._options, self._config.name)
        try:
            loaded = await thread.start()
        except asyncio.CancelledError:
            thread.request_stop()
            raise
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"model {self._config.name!r}: {exc}") from None
        except Exception as exc:
            raise BackendUnavailable(
                f"model {self._config.name!r}: exllamav2 could not load {model_dir}: {engine.first_line(exc)}"
            ) from exc
        self._thread, self._loaded, self._decode = thread, loaded, decode
        guided = loaded.grammar_tokenizer is not None
        self._capabilities = BackendCapabilities(
            max_concurrency=loaded.max_batch_size,
            context_length=min(self._config.context_length, self._options.max_seq_len),
            supports_constraints=guided,
            supports_logprobs=guided,
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
        events: asyncio.Queue[Event] = asyncio.Queue()
        key = thread.submit(request, logit_bias, events)
        text = IncrementalDetokenizer(decode, request.prompt_ids[-1:] if request.continuation else ())
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failure):
                    finished = True
                    raise (GrammarRejected if event.grammar else GenerationFailed)(event.message)
                delta = text.push(event.token_ids)
                if event.finish_reason is not None:
                    finished = True
                    yield TokenDelta(
                        delta + text.flush(),
                        event.token_ids,
                        event.finish_reason,
                        logprobs=event.logprobs,
                    )
                    return
                yield TokenDelta(delta, event.token_ids, logprobs=event.logprobs)
        finally:
            if not finished:
                thread.cancel(key)
