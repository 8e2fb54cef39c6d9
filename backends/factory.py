"""Build a backend by its kind; an engine is imported only when a model uses it.

A local engine runs in a process of its own when its model's ``engine_process`` option says so
(`backends.engine_process`); that is the default for exllamav2, whose Python work per token
would otherwise compete with the gateway's HTTP for one interpreter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from backends.base import Backend, BackendUnavailable, PreparesWeights
from backends.config import BackendConfig

BackendKind = Literal["llamacpp", "exllamav2", "openai", "scripted"]

ENGINE_PROCESS_OPTION = "engine_process"
ENGINE_PROCESS_BY_DEFAULT: dict[str, bool] = {"llamacpp": False, "exllamav2": True, "scripted": False}
"""The local engines, which may run in a process of their own, and whether they do by default."""


def create_backend(kind: BackendKind, config: BackendConfig, *, weights_dir: Path | None = None) -> Backend:
    """The backend of this kind for this model.

    ``weights_dir`` is where llama.cpp keeps weights it converts (``compute_format``).
    Raises `BackendUnavailable` for a kind no engine here serves, or a bad ``engine_process``.
    """
    apart = config.options.get(ENGINE_PROCESS_OPTION, ENGINE_PROCESS_BY_DEFAULT.get(kind, False))
    if not isinstance(apart, bool):
        raise BackendUnavailable(f"model {config.name!r}: engine_process must be true or false, not {apart!r}")
    if ENGINE_PROCESS_OPTION in config.options and kind not in ENGINE_PROCESS_BY_DEFAULT:
        raise BackendUnavailable(f"model {config.name!r}: engine_process is an option of local engines, not {kind!r}")
    options = {name: value for name, value in config.options.items() if name != ENGINE_PROCESS_OPTION}
    local = dataclasses.replace(config, options=options)
    backend = _in_process(kind, local, weights_dir)
    if not apart:
        return backend
    from backends.engine_process.backend import EngineProcessBackend, WeightsPreparingEngineProcess

    wrapper = WeightsPreparingEngineProcess if isinstance(backend, PreparesWeights) else EngineProcessBackend
    return wrapper(kind, local, backend, weights_dir=weights_dir)


def _in_process(kind: BackendKind, config: BackendConfig, weights_dir: Path | None) -> Backend:
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
