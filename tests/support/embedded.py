"""The embedded model run directly through llama-cpp-python, beside the gateway, on the same machine.

Which text a small model produces depends on the CPU's kernels, so tests never hard-code it: they
compare what the gateway returns with what the same engine, on the same weights file, produces when
called directly here. Both sides load the F16 conversion the embedded default serves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from backends.llamacpp.weights import ensure_converted
from gateway.serving.prompts import Message
from gateway.serving.registry import build_registry
from gateway.settings import EMBEDDED_GGUF_SHA256, ModelConfig, embedded_model, embedded_model_path

# Greater than any prompt the tests send; the direct engine's context size does not change its output.
DIRECT_CONTEXT = 2048


def shared_data_dir(factory: pytest.TempPathFactory) -> Path:
    """The data directory all the test gateways of one run share, so the weights convert once."""
    return factory.getbasetemp() / "gateway-data"


class DirectEngine:
    """Greedy decoding of the embedded model with llama-cpp-python's own sampler, from a clean cache."""

    def __init__(self, llama: Any, config: ModelConfig) -> None:
        self._llama = llama
        # The gateway's own runtime builds the prompts (its engine is never started here).
        self._runtime = build_registry([config]).get(config.name)

    def chat_ids(self, user: str) -> list[int]:
        """The prompt the gateway builds for one user message (with the model's default system prompt)."""
        return self._runtime.chat_prompt_ids([Message("user", user)])

    def greedy(self, prompt_ids: Sequence[int], max_tokens: int) -> list[int]:
        """The ids sampled greedily after ``prompt_ids``, the end-of-sequence token left out."""
        from llama_cpp import llama_cpp as lib

        self._llama.reset()
        vocab = self._llama._model.vocab
        sampled: list[int] = []
        for token in self._llama.generate(list(prompt_ids), temp=0.0, repeat_penalty=1.0, reset=True):
            if lib.llama_vocab_is_eog(vocab, token) or len(sampled) == max_tokens:
                break
            sampled.append(token)
        return sampled

    def decode(self, ids: Sequence[int]) -> str:
        return self._runtime.tokenizer.decode(ids)

    def text_ids(self, text: str) -> list[int]:
        """The prompt the gateway builds for a legacy completion of ``text``."""
        return self._runtime.text_prompt_ids(text)

    def logprobs(
        self, context: Sequence[int], tokens: Sequence[int], top: int
    ) -> list[tuple[bytes, float, list[tuple[bytes, float]]]]:
        """For each of ``tokens`` after ``context``: its bytes, its log-probability and the ``top``
        most likely (bytes, log-probability) pairs, from the engine's raw logits (log-softmax)."""
        import ctypes

        import numpy as np
        from llama_cpp import llama_cpp as lib

        llama = self._llama
        vocab = llama._model.vocab
        buffer = ctypes.create_string_buffer(256)

        def piece(token: int) -> bytes:
            n = lib.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
            return buffer.raw[:n]

        llama.reset()
        llama.eval(list(context))
        results = []
        for token in tokens:
            logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),)).astype(np.float64)
            shifted = logits - logits.max()
            logprobs = shifted - np.log(np.exp(shifted).sum())
            order = [int(i) for i in np.lexsort((np.arange(len(logprobs)), -logprobs))[:top]]
            results.append((piece(token), float(logprobs[token]), [(piece(i), float(logprobs[i])) for i in order]))
            llama.eval([token])
        return results


def embedded_f16_path(data_dir: Path) -> Path:
    weights = ensure_converted(embedded_model_path(), "f16", data_dir / "weights", expected_sha256=EMBEDDED_GGUF_SHA256)
    return weights.path


@pytest.fixture(scope="session")
def direct_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirectEngine]:
    from llama_cpp import Llama

    from backends.llamacpp.log_routing import route_llama_cpp_logs

    route_llama_cpp_logs()
    llama = Llama(
        model_path=str(embedded_f16_path(shared_data_dir(tmp_path_factory))), n_ctx=DIRECT_CONTEXT, verbose=False
    )
    try:
        yield DirectEngine(llama, embedded_model())
    finally:
        llama.close()
