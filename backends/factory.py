"""Build a backend by its kind; an engine is imported only when a model uses it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from backends.base import Backend, BackendUnavailable
from backends.config import BackendConfig

BackendKind = Literal["llamacpp", "exllamav2", "openai", "scripted"]


def create_backend(kind: BackendKind, config: BackendConfig, *, weights_dir: Path | None = None) -> Backend:
    """The backend of this kind for this model.

    ``weights_dir`` is where llama.cpp keeps weights it converts (``compute_format``).
    Raises `BackendUnavailable` for a kind no engine here serves.
    """
    if kind == "llamacpp":
        from backends.llamacpp.backend import LlamaCppBackend

        return LlamaCppBackend(config, weights_dir=weights_dir)
    if kind == "exllamav2":
        from backends.exllamav2 import ExLlamaV2Backend

        return ExLlamaV2Backend(config)
    if kind == "openai":
        from backends.openai_upstream import OpenAIUpstreamBackend

        return OpenAIUpstreamBackend(config)
    if kind == "scripted":
        from backends.scripted import ScriptedBackend

        return ScriptedBackend.from_config(config)
    raise BackendUnavailable(f"model {config.name!r}: backend {kind!r} is not available")
