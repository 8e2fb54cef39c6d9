"""The backend factory builds each kind from a `BackendConfig`; the registry fills that config in."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

import pytest

from backends.base import BackendUnavailable
from backends.config import BackendConfig
from backends.engine_process.backend import EngineProcessBackend, WeightsPreparingEngineProcess
from backends.exllamav2 import ExLlamaV2Backend
from backends.factory import BackendKind, create_backend
from backends.llamacpp.backend import LlamaCppBackend
from backends.openai_upstream import OpenAIUpstreamBackend
from backends.scripted import ScriptedBackend
from gateway.serving.registry import backend_config
from gateway.settings import ModelConfig, Pricing

OPTIONS: dict[str, dict[str, Any]] = {
    "llamacpp": {"n_ctx": 1024},
    "exllamav2": {"paged": False},
    "openai": {"base_url": "http://127.0.0.1:1/v1"},
    "scripted": {"reply": "Hi."},
}
TYPES: dict[str, type] = {
    "llamacpp": LlamaCppBackend,
    "exllamav2": EngineProcessBackend,  # its Python per token stays out of the gateway's interpreter
    "openai": OpenAIUpstreamBackend,
    "scripted": ScriptedBackend,
}


def test_every_kind_has_a_case_here() -> None:
    assert set(get_args(BackendKind)) == set(TYPES) == set(OPTIONS)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_each_kind_creates_its_backend(kind: BackendKind, tmp_path: Path) -> None:
    config = BackendConfig(
        name="m", path=str(tmp_path / "weights"), context_length=1024, max_concurrency=2, options=OPTIONS[kind]
    )
    backend = create_backend(kind, config, weights_dir=tmp_path)
    assert type(backend) is TYPES[kind]
    assert backend.capabilities.context_length == 1024


@pytest.mark.parametrize(
    ("kind", "apart", "expected"),
    [
        ("llamacpp", True, WeightsPreparingEngineProcess),
        ("llamacpp", False, LlamaCppBackend),
        ("exllamav2", False, ExLlamaV2Backend),
        ("exllamav2", True, EngineProcessBackend),
        ("scripted", True, EngineProcessBackend),
    ],
)
def test_engine_process_chooses_where_a_local_engine_runs(
    kind: BackendKind, apart: bool, expected: type, tmp_path: Path
) -> None:
    config = BackendConfig(name="m", path=str(tmp_path / "weights"), options=OPTIONS[kind] | {"engine_process": apart})
    backend = create_backend(kind, config, weights_dir=tmp_path)
    assert type(backend) is expected
    in_process = create_backend(kind, replace(config, options=OPTIONS[kind] | {"engine_process": False}))
    assert backend.capabilities == in_process.capabilities, "known before the engine process reports its own"


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("llamacpp", "yes", "engine_process must be true or false, not 'yes'"),
        ("llamacpp", 1, "engine_process must be true or false, not 1"),
        ("openai", True, "engine_process is an option of local engines, not 'openai'"),
    ],
)
def test_a_bad_engine_process_option_is_refused(kind: BackendKind, value: object, message: str) -> None:
    config = BackendConfig(name="m", options=OPTIONS[kind] | {"engine_process": value})
    with pytest.raises(BackendUnavailable) as caught:
        create_backend(kind, config)
    assert str(caught.value) == f"model 'm': {message}"


def test_llamacpp_gets_the_weights_dir(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config = BackendConfig(name="m", path=str(tmp_path / "model.gguf"), options={"compute_format": "f16"})
    with pytest.raises(BackendUnavailable, match="compute_format needs a weights directory"):
        create_backend("llamacpp", config).preflight()  # type: ignore[attr-defined]
    assert create_backend("llamacpp", config, weights_dir=tmp_path)._weights_dir == tmp_path  # type: ignore[attr-defined]


def test_an_unknown_kind_is_unavailable() -> None:
    kind: Any = "tensorrt"
    with pytest.raises(BackendUnavailable) as caught:
        create_backend(kind, BackendConfig(name="m"))
    assert str(caught.value) == "model 'm': backend 'tensorrt' is not available"


def test_the_registry_tells_the_backend_only_what_it_reads() -> None:
    model = ModelConfig(
        name="llama-2-7b-chat",
        backend="llamacpp",
        path="/models/llama-2-7b-chat.gguf",
        template="llama-2",
        context_length=2048,
        pricing=Pricing(input_per_million=Decimal("0.5"), output_per_million=Decimal("1")),
        max_concurrency=3,
        max_queue=7,
        aliases=["chat"],
        options={"n_ctx": 2048, "n_threads": 8},
    )
    config = backend_config(model)
    assert config == BackendConfig(
        name="llama-2-7b-chat",
        path="/models/llama-2-7b-chat.gguf",
        context_length=2048,
        max_concurrency=3,
        options={"n_ctx": 2048, "n_threads": 8},
    )
    assert isinstance(config.options, MappingProxyType), "read-only"
    model.options["n_threads"] = 1
    assert config.options["n_threads"] == 8, "a copy, not a view of the gateway's dict"


def test_the_registry_keeps_the_defaults() -> None:
    config = backend_config(ModelConfig(name="m", backend="scripted"))
    assert config == BackendConfig(name="m")
