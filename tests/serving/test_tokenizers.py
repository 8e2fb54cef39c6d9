from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gateway.serving.tokenizers import (
    GGUFTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_chat_template,
    load_tokenizer,
)
from gateway.settings import ConfigError, ModelConfig, embedded_model


@pytest.fixture(scope="module", params=["sentencepiece", "hf", "gguf"])
def llama2_tokenizer(
    request: pytest.FixtureRequest, llama2_tokenizer_dir: Path, llama2_reference_dir: Path
) -> Tokenizer:
    if request.param == "sentencepiece":
        return SentencePieceTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.model")
    if request.param == "hf":
        return HFTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.json")
    return GGUFTokenizer.from_file(llama2_reference_dir / "vocab-llama-spm.gguf")


def test_reference_count(reference_tokenizations: list[tuple[str, list[int]]]) -> None:
    assert len(reference_tokenizations) == 46


def test_reproduces_reference_tokenizations(
    llama2_tokenizer: Tokenizer, reference_tokenizations: list[tuple[str, list[int]]]
) -> None:
    for text, ids in reference_tokenizations:
        assert llama2_tokenizer.encode(text) == ids, text
    # A second time, from the memo of recent encodings.
    for text, ids in reference_tokenizations:
        assert llama2_tokenizer.encode(text) == ids, text


def test_decode_round_trip(llama2_tokenizer: Tokenizer, reference_tokenizations: list[tuple[str, list[int]]]) -> None:
    for text, ids in reference_tokenizations:
        assert llama2_tokenizer.decode(ids) == text, ids


def test_special_tokens(llama2_tokenizer: Tokenizer) -> None:
    assert (llama2_tokenizer.bos_id, llama2_tokenizer.eos_id) == (1, 2)
    assert (llama2_tokenizer.bos_token, llama2_tokenizer.eos_token) == ("<s>", "</s>")


def test_plain_encode_keeps_special_text_as_characters(llama2_tokenizer: Tokenizer) -> None:
    ids = llama2_tokenizer.encode("<s>[INST] hi </s><unk>")
    assert not {0, 1, 2} & set(ids)
    assert llama2_tokenizer.decode(ids) == "<s>[INST] hi </s><unk>"


def test_encode_with_special_parses_control_tokens(llama2_tokenizer: Tokenizer) -> None:
    # As llama.cpp and Hugging Face's legacy Llama tokenizer: each text after a special token gets
    # its own leading-space marker.
    expected = [1, *llama2_tokenizer.encode("[INST] hi [/INST] ok "), 2, 1, *llama2_tokenizer.encode("more")]
    assert llama2_tokenizer.encode_with_special("<s>[INST] hi [/INST] ok </s><s>more") == expected


def test_decode_skips_control_tokens(llama2_tokenizer: Tokenizer) -> None:
    assert llama2_tokenizer.decode([1, *llama2_tokenizer.encode("Hello world"), 2]) == "Hello world"


def test_hf_tokenizer_reads_special_tokens_from_config(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "<unk>"}))
    tokenizer = HFTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.json", config)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_token) == (1, 0, "<unk>")


def test_hf_tokenizer_rejects_unknown_special_token(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(ConfigError, match="begin_of_text"):
        HFTokenizer.from_file(llama2_tokenizer_dir / "tokenizer.json", config)


def test_load_tokenizer_llama2_uses_sentencepiece_beside_the_weights(
    tmp_path: Path, llama2_tokenizer_dir: Path
) -> None:
    shutil.copy(llama2_tokenizer_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    model = ModelConfig(name="m", backend="llamacpp", path=str(tmp_path / "model.gguf"), template="llama-2")
    assert isinstance(load_tokenizer(model), SentencePieceTokenizer)


def test_load_tokenizer_llama2_without_tokenizer_model(tmp_path: Path) -> None:
    model = ModelConfig(name="m", backend="exllamav2", path=str(tmp_path), template="llama-2")
    with pytest.raises(ConfigError, match=r"model 'm'.*tokenizer\.model"):
        load_tokenizer(model)


def test_load_tokenizer_jinja_gguf() -> None:
    tokenizer = load_tokenizer(embedded_model())
    assert isinstance(tokenizer, GGUFTokenizer)
    assert tokenizer.encode_with_special("<|im_start|>user") == [tokenizer.bos_id, *tokenizer.encode("user")]
    assert tokenizer.bos_id not in tokenizer.encode("<|im_start|>user")


def test_load_tokenizer_jinja_directory(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    shutil.copy(llama2_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    model = ModelConfig(name="m", backend="exllamav2", path=str(tmp_path), template="jinja")
    assert isinstance(load_tokenizer(model), HFTokenizer)


def test_load_tokenizer_jinja_directory_without_tokenizer_json(tmp_path: Path) -> None:
    model = ModelConfig(name="m", backend="exllamav2", path=str(tmp_path), template="jinja")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        load_tokenizer(model)


def test_load_tokenizer_explicit_path(llama2_reference_dir: Path) -> None:
    model = ModelConfig(
        name="m",
        backend="openai",
        template="jinja",
        tokenizer=str(llama2_reference_dir / "vocab-llama-spm.gguf"),
    )
    assert isinstance(load_tokenizer(model), GGUFTokenizer)


def test_load_chat_template_from_gguf() -> None:
    template = load_chat_template(embedded_model())
    assert template is not None
    assert "<|im_start|>" in template


def test_load_chat_template_from_tokenizer_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    model = ModelConfig(name="m", backend="exllamav2", path=str(tmp_path))
    assert load_chat_template(model) == "{{ messages }}"


def test_load_chat_template_named_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    model = ModelConfig(name="m", backend="exllamav2", path=str(tmp_path))
    assert load_chat_template(model) == "chat"


def test_load_chat_template_absent(tmp_path: Path, llama2_reference_dir: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert load_chat_template(ModelConfig(name="m", backend="exllamav2", path=str(tmp_path))) is None
    vocab_only = ModelConfig(name="m", backend="llamacpp", path=str(llama2_reference_dir / "vocab-llama-spm.gguf"))
    assert load_chat_template(vocab_only) is None


def test_missing_gguf_is_a_config_error(tmp_path: Path) -> None:
    model = ModelConfig(name="m", backend="llamacpp", path=str(tmp_path / "absent.gguf"))
    with pytest.raises(ConfigError, match=r"absent\.gguf does not exist"):
        load_tokenizer(model)


def test_malformed_tokenizer_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json")
