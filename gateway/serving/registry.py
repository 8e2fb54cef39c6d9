"""Served models: each configured model with its backend, tokenizer, template and queue."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backends.base import Backend, Preflight, PreparesWeights, ReportsProblems, WeightsProgress
from backends.config import BackendConfig
from backends.factory import create_backend
from gateway.errors import model_not_found
from gateway.serving.prompts import Message
from gateway.serving.prompts.jinja import build_jinja_prompt
from gateway.serving.prompts.llama2 import build_llama2_prompt
from gateway.serving.queueing import SlotQueue
from gateway.serving.tokenizers import Tokenizer, load_chat_template, load_tokenizer
from gateway.serving.tools import FunctionTool, ToolChoice
from gateway.serving.tools.convention import apply_tool_convention, tool_specs
from gateway.serving.tools.formats import FORMATS, ToolCallFormat, detect_format
from gateway.settings import ConfigError, ModelConfig


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools one request offers, and how this model is told of them and writes its calls."""

    tools: tuple[FunctionTool, ...]
    choice: ToolChoice
    parallel: bool
    format: ToolCallFormat
    native: bool
    """The model's own template renders the tools; otherwise the gateway's convention does."""


def backend_config(model: ModelConfig) -> BackendConfig:
    """What the model's backend is told about it: no prices, templates or queue sizes."""
    return BackendConfig(
        name=model.name,
        path=model.path,
        context_length=model.context_length,
        max_concurrency=model.max_concurrency,
        options=model.options,
    )


def _create_backend(model: ModelConfig, weights_dir: Path | None) -> Backend:
    return create_backend(model.backend, backend_config(model), weights_dir=weights_dir)


@dataclass
class ModelRuntime:
    config: ModelConfig
    backend: Backend
    tokenizer: Tokenizer
    chat_template: str | None
    queue: SlotQueue = field(init=False)

    def __post_init__(self) -> None:
        self.queue = SlotQueue(self.backend.capabilities.max_concurrency, self.config.max_queue)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def usable_context_length(self) -> int:
        return self.backend.capabilities.context_length

    def with_default_system(self, messages: Sequence[Message]) -> list[Message]:
        system = self.config.defaults.system_prompt
        if system is not None and not any(m.role == "system" for m in messages):
            return [Message("system", system), *messages]
        return list(messages)

    @functools.cached_property
    def tool_prompting(self) -> tuple[ToolCallFormat, bool]:
        """The format this model writes calls in, and whether its own template renders tools."""
        if self.config.template == "jinja" and self.chat_template is not None:
            detected = detect_format(self.chat_template)
            if detected is not None:
                configured = self.config.tool_call_format
                return (FORMATS[configured] if configured else detected), True
        return FORMATS["hermes"], False

    def chat_prompt_ids(self, messages: Sequence[Message], tools: ToolPlan | None = None) -> list[int]:
        """The prompt for ``messages``; ``tools`` are described to the model when given."""
        messages = self.with_default_system(messages)
        native = self.tool_prompting[1]
        if not native and (tools is not None or any(m.role == "tool" or m.tool_calls for m in messages)):
            offered = tools.tools if tools is not None else ()
            choice = tools.choice if tools is not None else ToolChoice("none")
            messages = apply_tool_convention(messages, offered, choice)
        if self.config.template == "llama-2":
            return build_llama2_prompt(messages, self.tokenizer)
        if self.chat_template is None:
            raise ConfigError(f"model {self.name!r} has no chat template; use template: llama-2")
        specs = tool_specs(tools.tools) if native and tools is not None else None
        return build_jinja_prompt(self.chat_template, messages, self.tokenizer, tools=specs)

    def text_prompt_ids(self, text: str) -> list[int]:
        """A raw completion prompt: BOS where the model wants it, then the text as plain text."""
        bos = [self.tokenizer.bos_id] if self.tokenizer.add_bos else []
        return [*bos, *self.tokenizer.encode(text)]


class ModelRegistry:
    def __init__(self, runtimes: Iterable[ModelRuntime]) -> None:
        self._by_name: dict[str, ModelRuntime] = {}
        self._runtimes = list(runtimes)
        for runtime in self._runtimes:
            for name in (runtime.name, *runtime.config.aliases):
                self._by_name[name] = runtime

    def __iter__(self) -> Iterator[ModelRuntime]:
        return iter(self._runtimes)

    def fallbacks_of(self, runtime: ModelRuntime) -> list[ModelRuntime]:
        """The models configured to serve ``runtime``'s requests when it fails, in order."""
        return [self.get(name) for name in runtime.config.fallbacks]

    def get(self, name: str) -> ModelRuntime:
        runtime = self._by_name.get(name)
        if runtime is None:
            raise model_not_found(name)
        return runtime

    async def start(self) -> None:
        started: list[ModelRuntime] = []
        try:
            for runtime in self._runtimes:
                await runtime.backend.start()
                started.append(runtime)
        except BaseException:
            for runtime in started:
                with contextlib.suppress(Exception):
                    await runtime.backend.stop()
            raise

    async def stop(self) -> None:
        for runtime in self._runtimes:
            await runtime.backend.stop()

    def problems(self) -> list[str]:
        """Why started models cannot serve now (an engine process restarting), for ``/ready``."""
        return [
            problem
            for runtime in self._runtimes
            if isinstance(runtime.backend, ReportsProblems) and (problem := runtime.backend.problem()) is not None
        ]


def build_registry(
    configs: Sequence[ModelConfig], backends: dict[str, Backend] | None = None, weights_dir: Path | None = None
) -> ModelRegistry:
    """Runtimes for every configured model; ``backends`` overrides engines by model name."""
    runtimes = []
    for config in configs:
        backend = (backends or {}).get(config.name) or _create_backend(config, weights_dir)
        tokenizer = load_tokenizer(config)
        template = None if config.template == "llama-2" else load_chat_template(config)
        runtimes.append(ModelRuntime(config, backend, tokenizer, template))
    return ModelRegistry(runtimes)


WeightsProgressFactory = Callable[[str], WeightsProgress]
"""Given a model's name, a callback for (bytes done, bytes in all) while its weights are converted."""


def preflight(
    configs: Sequence[ModelConfig], weights_dir: Path | None = None, progress: WeightsProgressFactory | None = None
) -> None:
    """Check every model can be served here, so ``serve`` refuses to start with one clear sentence,
    and make the weights files that backends convert (once; later starts find them)."""
    for config in configs:
        backend = _create_backend(config, weights_dir)
        if isinstance(backend, Preflight):
            backend.preflight()
        if isinstance(backend, PreparesWeights):
            backend.prepare_weights(progress(config.name) if progress is not None else None)
        load_tokenizer(config)
