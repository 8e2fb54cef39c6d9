"""exllamav2's sampler settings and logit bias, from a request's sampling settings."""

from __future__ import annotations

import pytest

from backends.base import GenerationFailed, SamplingParams
from backends.exllamav2.sampling import logit_bias_entries, sampler_settings_kwargs
from tests.backends.exllamav2.fake_engine import EXLLAMAV2_SETTINGS_DEFAULTS

# Fields that act only when another one switches them on (mirostat, DRY, XTC), or hold state.
SWITCHED_OR_STATE = {
    "mirostat_tau", "mirostat_eta", "mirostat_mu", "post_sampling_hooks",
    "dry_allowed_length", "dry_base", "dry_sequence_breakers", "dry_range", "dry_max_ngram",
    "ngram_trie", "ngram_index", "ngram_history", "xtc_threshold", "xtc_ignore_tokens",
}  # fmt: skip


def test_sampler_maps_every_request_field() -> None:
    sampling = SamplingParams(
        max_tokens=100, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.15,
        presence_penalty=0.5, frequency_penalty=0.25, seed=7, min_tokens=3, logit_bias={5: 1.0},
    )  # fmt: skip
    kwargs = sampler_settings_kwargs(sampling)
    assert kwargs["temperature"] == 0.7
    assert kwargs["top_p"] == 0.9
    assert kwargs["top_k"] == 40
    assert kwargs["min_p"] == 0.05
    assert kwargs["token_repetition_penalty"] == 1.15
    assert kwargs["token_presence_penalty"] == 0.5
    assert kwargs["token_frequency_penalty"] == 0.25
    assert kwargs["token_repetition_range"] == -1
    assert kwargs["token_repetition_decay"] == 0
    # Bias, seed and token limits travel on the job, not in the settings.
    assert kwargs["token_bias"] is None


def test_neutral_request_is_neutral_in_exllamav2() -> None:
    kwargs = sampler_settings_kwargs(SamplingParams(max_tokens=10))
    assert kwargs["temperature"] == 1.0
    assert kwargs["top_k"] == 0
    assert kwargs["top_p"] == 1.0
    assert kwargs["min_p"] == 0.0
    assert kwargs["token_repetition_penalty"] == 1.0
    assert kwargs["token_presence_penalty"] == 0.0
    assert kwargs["token_frequency_penalty"] == 0.0
    off = {"top_a": 0.0, "tfs": 0.0, "typical": 0.0, "skew": 0.0, "smoothing_factor": 0.0, "min_temp": 0.0,
           "max_temp": 0.0, "temp_exponent": 1.0, "temperature_last": False, "mirostat": False,
           "dry_multiplier": 0.0, "xtc_probability": 0.0, "cfg_scale": None}  # fmt: skip
    assert {k: kwargs[k] for k in off} == off


def test_greedy_keeps_penalties() -> None:
    kwargs = sampler_settings_kwargs(
        SamplingParams(max_tokens=10, temperature=0.0, top_p=0.5, top_k=40, min_p=0.2, repetition_penalty=1.2)
    )
    assert (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["min_p"]) == (1.0, 1, 1.0, 0.0)
    assert kwargs["token_repetition_penalty"] == 1.2


def test_every_exllamav2_default_is_overridden() -> None:
    kwargs = sampler_settings_kwargs(SamplingParams(max_tokens=1))
    assert set(kwargs) <= set(EXLLAMAV2_SETTINGS_DEFAULTS), "names unknown to exllamav2 0.3.2"
    assert set(EXLLAMAV2_SETTINGS_DEFAULTS) - SWITCHED_OR_STATE - set(kwargs) == set()


def test_logit_bias_entries() -> None:
    sampling = SamplingParams(max_tokens=1, logit_bias={29871: -100.0, 3: 5.0})
    assert logit_bias_entries(sampling, 32000) == [(3, 5.0), (29871, -100.0)]
    with pytest.raises(GenerationFailed, match="outside the vocabulary of 32000"):
        logit_bias_entries(SamplingParams(max_tokens=1, logit_bias={32000: 1.0}), 32000)
    with pytest.raises(GenerationFailed, match="finite"):
        logit_bias_entries(SamplingParams(max_tokens=1, logit_bias={1: float("nan")}), 32000)
