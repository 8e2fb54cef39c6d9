"""What this machine has for exllamav2: flash-attn, the model directory, torch and the engine.

Nothing here imports torch or exllamav2 at module level; `import_engine` does, when a model starts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from types import SimpleNamespace

from backends.base import BackendUnavailable
from backends.config import BackendConfig

logger = logging.getLogger(__name__)


def paged_attention_available() -> bool:
    """Whether exllamav2 will find flash-attn >= 2.5.7, judged without importing anything."""
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ or importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return False
    numbers = [int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit()]
    return numbers >= [2, 5, 7]


def check_model_dir(config: BackendConfig) -> Path:
    """The model directory, once it has what exllamav2 0.3.2 loads (config.json, tokenizer.json)."""
    if not config.path:
        raise BackendUnavailable(f"model {config.name!r}: the exllamav2 backend needs 'path' (a model directory)")
    model_dir = Path(config.path)
    if not model_dir.is_dir():
        raise BackendUnavailable(f"model {config.name!r}: {model_dir} is not a model directory")
    for name in ("config.json", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise BackendUnavailable(f"model {config.name!r}: the model directory {model_dir} has no {name}")
    return model_dir


def import_engine(model_name: str) -> SimpleNamespace:
    """Import torch and exllamav2, or say in one sentence why this machine cannot run them.

    The first import of exllamav2 compiles its CUDA extension (minutes; needs nvcc and ninja).
    """
    prefix = f"model {model_name!r}: the exllamav2 backend"
    if importlib.util.find_spec("exllamav2") is None:
        raise BackendUnavailable(
            f"{prefix} needs the exllamav2 package, which is not installed (pip install 'llama-gateway[gpu]')"
        )
    if importlib.util.find_spec("torch") is None:
        raise BackendUnavailable(f"{prefix} needs PyTorch with CUDA, which is not installed")
    torch = importlib.import_module("torch")
    if torch.version.cuda is None:
        raise BackendUnavailable(f"{prefix} needs PyTorch with CUDA, but PyTorch {torch.__version__} has none")
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise BackendUnavailable(f"{prefix} needs an NVIDIA GPU, and none is visible to CUDA")
    logger.info("importing exllamav2 (its first import compiles the CUDA extension, which takes minutes)")
    try:
        exllamav2 = importlib.import_module("exllamav2")
        generator = importlib.import_module("exllamav2.generator")
        filters = importlib.import_module("exllamav2.generator.filters")
        attn = importlib.import_module("exllamav2.attn")
    except Exception as exc:
        raise BackendUnavailable(f"{prefix} could not import exllamav2: {first_line(exc)}") from exc
    return SimpleNamespace(
        torch=torch,
        exllamav2=exllamav2,
        Generator=generator.ExLlamaV2DynamicGenerator,
        Job=generator.ExLlamaV2DynamicJob,
        Settings=generator.ExLlamaV2Sampler.Settings,
        Filter=filters.ExLlamaV2Filter,
        has_paged_attention=bool(attn.has_flash_attn_with_paged),
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
