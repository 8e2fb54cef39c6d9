from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import sentencepiece
import tokenizers
from click.testing import CliRunner
from safetensors.numpy import load_file

from gateway.cli.main import main
from gateway.devtools import tiny_model_files
from gateway.devtools.tiny_model import tiny_model_command, write_tiny_model
from gateway.devtools.tiny_model_plan import plan_tensors
from gateway.serving.prompts import Message
from gateway.serving.prompts.llama2 import build_llama2_prompt
from gateway.serving.tokenizers import SentencePieceTokenizer

Weights = dict[str, npt.NDArray[Any]]


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((tiny_model_dir / "config.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def weights(tiny_model_dir: Path) -> Weights:
    return load_file(tiny_model_dir / "model.safetensors")


def test_files(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert names == {
        "README.md",
        "tokenizer.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "config.json",
        "model.safetensors",
        "model.gguf",
    }
    assert "Llama 2 Community License" in (tiny_model_dir / "README.md").read_text()


def test_config(config: dict[str, Any]) -> None:
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float16"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")} == {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 2,
    }
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (32000, 4096)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 10000.0)
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (1, 2, False)


def test_tokenizer_config(tiny_model_dir: Path) -> None:
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<s>", "</s>")
    assert tokenizer_config["add_bos_token"] is True
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    specials = json.loads((tiny_model_dir / "special_tokens_map.json").read_text())
    assert specials["eos_token"]["content"] == "</s>"


def test_safetensors_shapes(weights: Weights) -> None:
    plan = plan_tensors("tiny")
    assert {name: w.shape for name, w in weights.items()} == {t.name: t.shape for t in plan}
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float16)}
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (128, 256)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (256, 768)
    assert np.all(weights["model.norm.weight"] == 1)
    assert abs(float(weights["lm_head.weight"].std()) - 256**-0.5) < 1e-3


def test_output_tokenizers_reproduce_reference(
    tiny_model_dir: Path, reference_tokenizations: list[tuple[str, list[int]]]
) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    hf = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text, ids in reference_tokenizations:
        assert sp.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False).ids == ids


def test_gguf_metadata_and_vocabulary(tiny_model_dir: Path, llama2_reference_dir: Path) -> None:
    import gguf

    model = gguf.GGUFReader(tiny_model_dir / "model.gguf")
    reference = gguf.GGUFReader(llama2_reference_dir / "vocab-llama-spm.gguf")

    def value(reader: gguf.GGUFReader, key: str) -> Any:
        return reader.get_field(key).contents()

    assert value(model, "general.architecture") == "llama"
    assert value(model, "llama.block_count") == 2
    assert value(model, "llama.attention.head_count_kv") == 2
    assert value(model, "llama.context_length") == 4096
    assert value(model, "tokenizer.ggml.add_bos_token") is True
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert value(model, key) == value(reference, key), key
    assert np.allclose(value(model, "tokenizer.ggml.scores"), value(reference, "tokenizer.ggml.scores"))
    assert {t.name: tuple(int(d) for d in t.shape) for t in model.tensors} == {
        t.gguf_name: tuple(reversed(t.shape)) for t in plan_tensors("tiny")
    }


def _rms_norm(x: npt.NDArray[np.float64], weight: npt.NDArray[Any], eps: float) -> npt.NDArray[np.float64]:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def reference_logits(weights: Weights, config: dict[str, Any], ids: list[int]) -> npt.NDArray[np.float64]:
    """Hugging Face's LlamaForCausalLM forward pass in numpy (half-split rotary embedding)."""
    w = {name: value.astype(np.float64) for name, value in weights.items()}
    n, eps = len(ids), config["rms_norm_eps"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    inv_freq = config["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.outer(np.arange(n), inv_freq)
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))

    def rotate(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        half = head_dim // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    causal = np.triu(np.full((n, n), -np.inf), 1)
    h = w["model.embed_tokens.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, head_dim).transpose(1, 0, 2)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, head_dim).transpose(1, 0, 2)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, head_dim).transpose(1, 0, 2)
        k, v = np.repeat(rotate(k), heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
        scores = rotate(q) @ k.transpose(0, 2, 1) / math.sqrt(head_dim) + causal
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attended = (probs @ v).transpose(1, 0, 2).reshape(n, -1)
        h = h + attended @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = x @ w[p + "mlp.gate_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    result: npt.NDArray[np.float64] = _rms_norm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T
    return result


def test_gguf_runs_in_llama_cpp_and_matches_safetensors(
    tiny_model_dir: Path, weights: Weights, config: dict[str, Any]
) -> None:
    import llama_cpp

    tokenizer = SentencePieceTokenizer.from_file(tiny_model_dir / "tokenizer.model")
    ids = build_llama2_prompt(
        [Message("system", "Be brief."), Message("user", "What is the capital of France?")], tokenizer
    )
    llm = llama_cpp.Llama(str(tiny_model_dir / "model.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    expected = reference_logits(weights, config, ids)
    # The tolerance covers llama.cpp's float16 KV cache; a wrong q/k layout misses by far more.
    np.testing.assert_allclose(logits, expected, atol=0.02)

    llm.reset()
    generated = list(itertools.islice(llm.generate(ids, temp=0.0), 4))
    assert len(generated) == 4
    assert generated[0] == int(np.argmax(expected[-1]))


def test_sharded_safetensors(tmp_path: Path, weights: Weights, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_model_files, "MAX_SHARD_BYTES", 2 << 20)
    written = write_tiny_model(tmp_path, formats=("hf",))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert all(tmp_path / shard in written for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.gguf").exists()
    loaded: Weights = {}
    for shard in shards:
        part = load_file(tmp_path / shard)
        assert all(index["weight_map"][name] == shard for name in part)
        assert len(part) == 1 or sum(w.nbytes for w in part.values()) <= 2 << 20
        loaded.update(part)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in loaded.values())
    assert loaded.keys() == weights.keys()
    assert all(np.array_equal(loaded[name], weights[name]) for name in weights)


def test_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        write_tiny_model(tmp_path, formats=("onnx",))  # type: ignore[arg-type]


def test_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tiny-model", str(tmp_path / "out"), "--format", "gguf", "--seed", "3"])
    assert result.exit_code == 0, result.output
    printed = {Path(line).name for line in result.output.splitlines()}
    assert printed == {"tokenizer.model", "tokenizer.json", "README.md", "model.gguf"}
    assert main.commands["tiny-model"] is tiny_model_command


def test_cli_help() -> None:
    result = CliRunner().invoke(tiny_model_command, ["--help"])
    assert result.exit_code == 0
    assert "--size [tiny|7b|70b]" in result.output
