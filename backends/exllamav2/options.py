"""ExLlamaV2's options: a model entry's ``options:``, checked before anything is loaded.

Options (all optional)::

    max_seq_len      longest sequence, prompt + completion (default: context_length; a multiple of 256)
    cache_mode       fp16 | q8 | q6 | q4: the K/V cache's precision (default fp16)
    gpu_split        [GB, GB, ...] of weights per GPU, in device order
    autosplit        fill GPUs in order, leaving reserve_vram_gb free (default when no gpu_split)
    tensor_parallel  split every layer across the GPUs (by gpu_split, else by free VRAM)
    reserve_vram_gb  GB left free per GPU (one number or one per GPU) by autosplit / tensor_parallel
    max_batch_size   sequences decoded together (default: max_concurrency; paged mode only)
    max_chunk_size   prompt tokens per forward pass while prefilling (default 2048; a multiple of 256)
    cache_size       tokens the K/V cache holds over all sequences (default max_seq_len × max_batch_size)
    paged            auto | true | false: paged attention with continuous batching, which needs
                     flash-attn >= 2.5.7 (auto: used when importable; else one sequence at a time)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from backends.base import BackendUnavailable
from backends.config import BackendConfig

CacheMode = Literal["fp16", "q8", "q6", "q4"]
CACHE_CLASSES: Mapping[str, str] = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
PAGE_SIZE = 256
"""exllamav2's cache page; cache sizes and prefill chunks are multiples of it."""
DEFAULT_CHUNK_SIZE = 2048
MAX_Q_SIZE = 8
"""Tokens per sequence per decode pass that the generator reserves room for (its default)."""
OPTION_NAMES = (
    "max_seq_len",
    "cache_mode",
    "gpu_split",
    "autosplit",
    "tensor_parallel",
    "reserve_vram_gb",
    "max_batch_size",
    "max_chunk_size",
    "cache_size",
    "paged",
)


@dataclass(frozen=True, slots=True)
class ExLlamaV2Options:
    """A model entry's ``options``, checked."""

    max_seq_len: int
    cache_mode: CacheMode = "fp16"
    gpu_split: tuple[float, ...] | None = None
    autosplit: bool = True
    tensor_parallel: bool = False
    reserve_vram_gb: tuple[float, ...] | float | None = None
    max_batch_size: int = 1
    max_chunk_size: int = DEFAULT_CHUNK_SIZE
    cache_size: int = 0
    paged: bool | None = None
    """None: paged when flash-attn >= 2.5.7 is importable."""


def parse_options(config: BackendConfig) -> ExLlamaV2Options:
    """Check a model entry's exllamav2 options; raise `BackendUnavailable` naming the bad value."""
    raw = dict(config.options)

    def fail(reason: str) -> BackendUnavailable:
        return BackendUnavailable(f"model {config.name!r}: {reason}")

    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        known = ", ".join(OPTION_NAMES)
        raise fail(f"unknown exllamav2 option {unknown[0]!r} (known options: {known})")

    def integer(name: str, default: int, minimum: int) -> int:
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(f"exllamav2 option {name!r} must be an integer >= {minimum}, not {value!r}")
        return value

    def flag(name: str, default: bool) -> bool:
        value = raw.get(name, default)
        if not isinstance(value, bool):
            raise fail(f"exllamav2 option {name!r} must be true or false, not {value!r}")
        return value

    def gigabytes(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise fail(f"exllamav2 option {name!r} needs numbers of GB >= 0, not {value!r}")
        return float(value)

    max_seq_len = integer("max_seq_len", config.context_length, PAGE_SIZE)
    if max_seq_len % PAGE_SIZE:
        raise fail(f"exllamav2 option 'max_seq_len' must be a multiple of {PAGE_SIZE}, not {max_seq_len}")

    cache_mode = raw.get("cache_mode", "fp16")
    if cache_mode not in CACHE_CLASSES:
        modes = ", ".join(CACHE_CLASSES)
        raise fail(f"exllamav2 option 'cache_mode' must be one of {modes}, not {cache_mode!r}")

    gpu_split: tuple[float, ...] | None = None
    if raw.get("gpu_split") is not None:
        split = raw["gpu_split"]
        if not isinstance(split, list) or not split:
            raise fail(f"exllamav2 option 'gpu_split' must be a list of GB per GPU, not {split!r}")
        gpu_split = tuple(gigabytes("gpu_split", v) for v in split)
        if not any(gpu_split):
            raise fail("exllamav2 option 'gpu_split' must give at least one GPU more than 0 GB")

    tensor_parallel = flag("tensor_parallel", False)
    autosplit = flag("autosplit", gpu_split is None and not tensor_parallel)
    if autosplit and gpu_split is not None:
        raise fail("exllamav2 options 'autosplit' and 'gpu_split' exclude each other; set one of them")
    if autosplit and tensor_parallel:
        raise fail("exllamav2 option 'tensor_parallel' splits by 'gpu_split' or free VRAM, not 'autosplit'")

    reserve: tuple[float, ...] | float | None = None
    if raw.get("reserve_vram_gb") is not None:
        value = raw["reserve_vram_gb"]
        if isinstance(value, list):
            if not value:
                raise fail("exllamav2 option 'reserve_vram_gb' must not be an empty list")
            reserve = tuple(gigabytes("reserve_vram_gb", v) for v in value)
        else:
            reserve = gigabytes("reserve_vram_gb", value)
        if gpu_split is not None:
            raise fail(
                "exllamav2 option 'reserve_vram_gb' applies to autosplit and to tensor_parallel without "
                "'gpu_split'; with 'gpu_split', give less GB per GPU instead"
            )

    max_chunk_size = integer("max_chunk_size", DEFAULT_CHUNK_SIZE, PAGE_SIZE)
    if max_chunk_size % PAGE_SIZE:
        raise fail(f"exllamav2 option 'max_chunk_size' must be a multiple of {PAGE_SIZE}, not {max_chunk_size}")

    max_batch_size = integer("max_batch_size", config.max_concurrency, 1)
    if max_batch_size * MAX_Q_SIZE > max(max_chunk_size, DEFAULT_CHUNK_SIZE):
        limit = max(max_chunk_size, DEFAULT_CHUNK_SIZE) // MAX_Q_SIZE
        raise fail(
            f"exllamav2 option 'max_batch_size' is {max_batch_size}, above the {limit} that "
            f"max_chunk_size {max_chunk_size} allows"
        )

    cache_size = integer("cache_size", max_seq_len * max_batch_size, max_seq_len)
    if cache_size % PAGE_SIZE:
        raise fail(f"exllamav2 option 'cache_size' must be a multiple of {PAGE_SIZE}, not {cache_size}")

    paged_raw = raw.get("paged", "auto")
    if paged_raw not in ("auto", True, False):
        raise fail(f"exllamav2 option 'paged' must be auto, true or false, not {paged_raw!r}")
    paged = None if paged_raw == "auto" else bool(paged_raw)

    return ExLlamaV2Options(
        max_seq_len=max_seq_len,
        cache_mode=cache_mode,
        gpu_split=gpu_split,
        autosplit=autosplit,
        tensor_parallel=tensor_parallel,
        reserve_vram_gb=reserve,
        max_batch_size=max_batch_size,
        max_chunk_size=max_chunk_size,
        cache_size=cache_size,
        paged=paged,
    )
