"""What an engine is told about the model it serves; the gateway fills it in from its own config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

ComputeFormat = Literal["f16", "bf16", "f32", "q8_0"]
"""What llama.cpp can compute a GGUF's weights in once converted (``backends.llamacpp.weights``)."""
WeightsFormat = Literal["stored", ComputeFormat]
"""A llama.cpp model's ``compute_format``: ``stored`` serves the file as it is."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One model as a backend sees it: nothing of prices, templates, keys or HTTP."""

    name: str
    """The model's name, for messages (and the default model name of a remote worker)."""
    path: str | None = None
    """Weights: a GGUF file (llamacpp) or a model directory (exllamav2); unused by the others."""
    context_length: int = 4096
    max_concurrency: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)
    """Engine-specific options, raw: each engine checks its own."""

    def __post_init__(self) -> None:
        # A read-only copy: the caller's dict may change later, this config must not.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
