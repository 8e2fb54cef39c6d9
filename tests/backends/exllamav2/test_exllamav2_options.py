"""exllamav2 options: defaults from the model entry, every option, and one-sentence errors."""

from __future__ import annotations

from typing import Any

import pytest

from backends.base import BackendUnavailable
from backends.config import BackendConfig
from backends.exllamav2.options import ExLlamaV2Options, parse_options
from tests.backends.exllamav2.fake_engine import model_config


def test_defaults_follow_the_model_entry() -> None:
    config = BackendConfig(name="m", path="/m", context_length=4096, max_concurrency=4, options={})
    options = parse_options(config)
    assert options == ExLlamaV2Options(
        max_seq_len=4096,
        cache_mode="fp16",
        gpu_split=None,
        autosplit=True,
        tensor_parallel=False,
        reserve_vram_gb=None,
        max_batch_size=4,
        max_chunk_size=2048,
        cache_size=4096 * 4,
        paged=None,
    )


def test_gpu_split_turns_autosplit_off() -> None:
    options = parse_options(model_config(gpu_split=[20, 23.5], cache_mode="q4", max_seq_len=4096))
    assert options.gpu_split == (20.0, 23.5)
    assert not options.autosplit
    assert not options.tensor_parallel
    assert options.cache_mode == "q4"


def test_autosplit_with_reserve_per_gpu() -> None:
    options = parse_options(model_config(autosplit=True, reserve_vram_gb=[1.5, 0.5]))
    assert options.autosplit
    assert options.reserve_vram_gb == (1.5, 0.5)
    assert parse_options(model_config(reserve_vram_gb=2)).reserve_vram_gb == 2.0


def test_tensor_parallel_by_split_or_free_vram() -> None:
    split = parse_options(model_config(tensor_parallel=True, gpu_split=[40, 40], cache_mode="q8"))
    assert split.tensor_parallel
    assert not split.autosplit
    assert split.gpu_split == (40.0, 40.0)
    free = parse_options(model_config(tensor_parallel=True, reserve_vram_gb=1))
    assert free.tensor_parallel
    assert not free.autosplit
    assert free.gpu_split is None


def test_no_split_loads_on_the_first_gpu() -> None:
    options = parse_options(model_config(autosplit=False))
    assert not options.autosplit
    assert options.gpu_split is None


@pytest.mark.parametrize("mode", ["fp16", "q8", "q6", "q4"])
def test_cache_modes(mode: str) -> None:
    assert parse_options(model_config(cache_mode=mode)).cache_mode == mode


def test_paged_and_sizes() -> None:
    options = parse_options(
        model_config(paged=False, max_batch_size=8, max_chunk_size=512, cache_size=16384, max_seq_len=4096)
    )
    assert options.paged is False
    assert options.max_batch_size == 8
    assert (options.max_chunk_size, options.cache_size) == (512, 16384)
    assert parse_options(model_config(paged=True)).paged is True
    assert parse_options(model_config(paged="auto")).paged is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"cache_mode": "q5"}, "'cache_mode' must be one of fp16, q8, q6, q4, not 'q5'"),
        ({"cache_mode": "FP8"}, "'cache_mode' must be one of"),
        ({"max_seq_len": 4000}, "'max_seq_len' must be a multiple of 256"),
        ({"max_seq_len": "4096"}, "'max_seq_len' must be an integer >= 256"),
        ({"max_seq_len": True}, "'max_seq_len' must be an integer"),
        ({"gpu_split": "20,24"}, "'gpu_split' must be a list of GB per GPU"),
        ({"gpu_split": []}, "'gpu_split' must be a list of GB per GPU"),
        ({"gpu_split": [20, -1]}, "'gpu_split' needs numbers of GB >= 0"),
        ({"gpu_split": [20, "24"]}, "'gpu_split' needs numbers of GB >= 0"),
        ({"gpu_split": [0, 0]}, "at least one GPU more than 0 GB"),
        ({"gpu_split": [20, 24], "autosplit": True}, "'autosplit' and 'gpu_split' exclude each other"),
        ({"tensor_parallel": True, "autosplit": True}, "'tensor_parallel' splits by 'gpu_split'"),
        ({"tensor_parallel": "yes"}, "'tensor_parallel' must be true or false"),
        ({"gpu_split": [20, 24], "reserve_vram_gb": 1}, "give less GB per GPU instead"),
        ({"reserve_vram_gb": -1}, "'reserve_vram_gb' needs numbers of GB >= 0"),
        ({"reserve_vram_gb": []}, "'reserve_vram_gb' must not be an empty list"),
        ({"max_batch_size": 0}, "'max_batch_size' must be an integer >= 1"),
        ({"max_batch_size": 1000}, "above the 256 that max_chunk_size 2048 allows"),
        ({"max_chunk_size": 300}, "'max_chunk_size' must be a multiple of 256"),
        ({"cache_size": 1024}, "'cache_size' must be an integer >= 4096"),
        ({"cache_size": 5000}, "'cache_size' must be a multiple of 256"),
        ({"paged": "yes"}, "'paged' must be auto, true or false"),
        ({"gpu_layers": 10}, "unknown exllamav2 option 'gpu_layers'"),
    ],
)
def test_bad_options_fail_with_one_sentence(options: dict[str, Any], words: str) -> None:
    with pytest.raises(BackendUnavailable) as caught:
        parse_options(model_config(**options))
    message = str(caught.value)
    assert words in message
    assert message.startswith("model 'llama-2-70b-chat': ")
    assert "\n" not in message
