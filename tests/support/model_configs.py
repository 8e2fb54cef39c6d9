"""Model entries the tests serve: the embedded SmolLM2, the tiny random Llama 2, scripted backends."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

from gateway.settings import ModelConfig, Pricing, RequestDefaults, load_settings
from tests.support.paths import LLAMA2_TOKENIZER_MODEL

EMBEDDED = "smollm2-135m-instruct"
TINY = "tiny-llama-2"
# Small contexts keep each llama.cpp context's KV cache (and start-up) small.
TEST_CONTEXT = 2048


def embedded_model(**changes: Any) -> ModelConfig:
    """The bundled SmolLM2 model exactly as the zero-config gateway serves it, with a smaller context."""
    model = load_settings(environ={}).models[0]
    model = replace_struct(model, context_length=TEST_CONTEXT, options=model.options | {"n_ctx": TEST_CONTEXT})
    return replace_struct(model, **changes)


def tiny_llama2_model(model_dir: Path, name: str = TINY, **changes: Any) -> ModelConfig:
    """The tiny random Llama 2 as a llama.cpp model with the ``llama-2`` template."""
    model = ModelConfig(
        name=name,
        backend="llamacpp",
        path=str(model_dir / "model.gguf"),
        template="llama-2",
        context_length=512,
        options={"n_ctx": 512},
    )
    return replace_struct(model, **changes)


def scripted_model(
    name: str,
    *,
    max_concurrency: int = 1,
    max_queue: int = 32,
    context_length: int = 4096,
    input_price: Decimal | str = "0",
    output_price: Decimal | str = "0",
    **options: Any,
) -> ModelConfig:
    """A scripted backend (``options``: reply, token_delay_ms, end_with_eos, ...) priced per 1M tokens,
    its prompts counted with the real Llama 2 tokenizer, so token counts and prices are real."""
    return ModelConfig(
        name=name,
        backend="scripted",
        template="llama-2",
        tokenizer=str(LLAMA2_TOKENIZER_MODEL),
        context_length=context_length,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        pricing=Pricing(Decimal(input_price), Decimal(output_price)),
        options=options,
    )


def with_system_prompt(model: ModelConfig, system_prompt: str) -> ModelConfig:
    return replace_struct(model, defaults=RequestDefaults(system_prompt=system_prompt))


def replace_struct(model: ModelConfig, **changes: Any) -> ModelConfig:
    return msgspec.structs.replace(model, **changes)
