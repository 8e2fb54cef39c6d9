"""From a request's sampling settings to exllamav2's sampler and logit bias."""

from __future__ import annotations

import math
from typing import Any

from backends.base import GenerationFailed, SamplingParams


def sampler_settings_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Every `ExLlamaV2Sampler.Settings` field that shapes the distribution, set from the request.

    exllamav2's defaults are not neutral (temperature 0.8, top_k 50, top_p 0.8, repetition
    penalty 1.025), so nothing is left to them. ``temperature == 0`` is greedy: top_k 1 after the
    penalties and the logit bias, as the OpenAI API defines it. exllamav2 applies the repetition,
    presence and frequency penalties over the whole sequence, prompt included.
    """
    greedy = sampling.temperature <= 0.0
    return {
        "temperature": 1.0 if greedy else sampling.temperature,
        "top_k": 1 if greedy else sampling.top_k,
        "top_p": 1.0 if greedy else sampling.top_p,
        "min_p": 0.0 if greedy else sampling.min_p,
        "token_repetition_penalty": sampling.repetition_penalty,
        "token_repetition_range": -1,
        "token_repetition_decay": 0,
        "token_presence_penalty": sampling.presence_penalty,
        "token_frequency_penalty": sampling.frequency_penalty,
        # Samplers the OpenAI API has no name for, switched off.
        "top_a": 0.0,
        "tfs": 0.0,
        "typical": 0.0,
        "skew": 0.0,
        "smoothing_factor": 0.0,
        "min_temp": 0.0,
        "max_temp": 0.0,
        "temp_exponent": 1.0,
        "temperature_last": False,
        "mirostat": False,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "cfg_scale": None,
        "token_bias": None,
    }


def logit_bias_entries(sampling: SamplingParams, vocab_size: int) -> list[tuple[int, float]]:
    """The request's logit bias as (token id, bias) pairs, every id inside the vocabulary."""
    entries = sorted((int(token), float(bias)) for token, bias in sampling.logit_bias.items())
    for token, bias in entries:
        if not 0 <= token < vocab_size:
            raise GenerationFailed(f"logit_bias names token {token}, outside the vocabulary of {vocab_size}")
        if not math.isfinite(bias):
            raise GenerationFailed(f"logit_bias for token {token} must be a finite number, not {bias}")
    return entries
