"""Helpers of the llama.cpp backend tests: model entries, prompts, and collecting a generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.base import Constraint, GenerationRequest, SamplingParams, TokenDelta
from backends.config import BackendConfig
from backends.llamacpp.backend import LlamaCppBackend
from gateway.serving.tokenizers import GGUFTokenizer
from gateway.settings import EMBEDDED_GGUF_SHA256, embedded_model_path

CONTEXT = 1024


def config(path: Path, **changes: Any) -> BackendConfig:
    fields: dict[str, Any] = {
        "name": "model",
        "path": str(path),
        "context_length": CONTEXT,
        "options": {"n_ctx": CONTEXT},
    }
    return BackendConfig(**(fields | changes))


def embedded_config(compute_format: str = "f16", **options: Any) -> BackendConfig:
    """The bundled SmolLM2 as the embedded default serves it: F16 from the shipped Q4_1 file."""
    fields = {"n_ctx": CONTEXT, "compute_format": compute_format, "sha256": EMBEDDED_GGUF_SHA256} | options
    return config(embedded_model_path(), options=fields)


def chat_ids(vocab: GGUFTokenizer, text: str) -> list[int]:
    """SmolLM2's chat format around one user message."""
    return vocab.encode_with_special(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


async def generate(
    backend: LlamaCppBackend,
    prompt: list[int],
    *,
    constraint: Constraint | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    **sampling: Any,
) -> list[TokenDelta]:
    sampling.setdefault("max_tokens", 16)
    request = GenerationRequest(
        "test",
        prompt,
        SamplingParams(**sampling),
        constraint=constraint,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    return [delta async for delta in backend.generate(request)]


def ids(deltas: list[TokenDelta]) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def text(deltas: list[TokenDelta]) -> str:
    return "".join(delta.text for delta in deltas)
