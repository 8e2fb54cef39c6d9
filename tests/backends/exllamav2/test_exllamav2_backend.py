"""`ExLlamaV2Backend` itself: built from its config, its capabilities, and start-up without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from backends.base import Backend, BackendUnavailable, GenerationRequest, SamplingParams
from backends.config import BackendConfig
from backends.exllamav2 import ExLlamaV2Backend, engine
from tests.backends.exllamav2.fake_engine import assert_one_sentence, model_config, write_model_dir


def request(prompt: list[int], **sampling: Any) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_ids=prompt, sampling=SamplingParams(**sampling))


def test_backend_rejects_bad_options_when_built() -> None:
    with pytest.raises(BackendUnavailable, match="cache_mode"):
        ExLlamaV2Backend(model_config(cache_mode="fp8"))


def test_capabilities_before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "paged_attention_available", lambda: True)
    backend = ExLlamaV2Backend(
        BackendConfig(name="m", path="/m", context_length=4096, max_concurrency=4, options={"max_seq_len": 2048})
    )
    assert isinstance(backend, Backend)
    assert backend.capabilities.context_length == 2048
    assert backend.capabilities.max_concurrency == 4
    assert backend.capabilities.supports_logit_bias
    assert backend.capabilities.supports_seed
    unpaged = ExLlamaV2Backend(model_config(paged=False, max_batch_size=4))
    assert unpaged.capabilities.max_concurrency == 1
    monkeypatch.setattr(engine, "paged_attention_available", lambda: False)
    assert ExLlamaV2Backend(model_config(max_batch_size=4)).capabilities.max_concurrency == 1


def gpu_stack_present() -> bool:
    if importlib.util.find_spec("exllamav2") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(gpu_stack_present(), reason="this machine has exllamav2, torch and a GPU")
async def test_start_on_this_machine_fails_with_one_sentence(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    model_dir = write_model_dir(tmp_path / "model", llama2_tokenizer_dir)
    backend = ExLlamaV2Backend(BackendConfig(name="llama-2-70b-chat", path=str(model_dir)))
    with pytest.raises(BackendUnavailable) as caught:
        await backend.start()
    assert_one_sentence(caught.value)
    assert caught.value.__cause__ is None
    assert any(words in str(caught.value) for words in ("exllamav2 package", "PyTorch", "NVIDIA GPU"))


async def test_generate_before_start_fails(model_dir: Path) -> None:
    backend = ExLlamaV2Backend(BackendConfig(name="m", path=str(model_dir)))
    with pytest.raises(BackendUnavailable, match="is not started"):
        [delta async for delta in backend.generate(request([1], max_tokens=1))]
