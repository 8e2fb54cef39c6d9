"""The backend factory builds each kind from a `BackendConfig`; the registry fills that config in."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, get_args

import pytest

from backends.base import BackendUnavailable
from backends.config import BackendConfig
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
    "exllamav2": ExLlamaV2Backend,
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
