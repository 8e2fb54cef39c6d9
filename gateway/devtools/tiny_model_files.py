"""Writing a planned random Llama 2 to disk: Hugging Face safetensors with their configs, and GGUF."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.devtools.tiny_model_plan import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    LlamaShape,
    PlannedTensor,
    permute_for_gguf,
    tensor_values,
)

MAX_SHARD_BYTES = 4 << 30


def tokenizer_data() -> Traversable:
    return resources.files("gateway") / "data" / "llama2-tokenizer"


def _write_json(path: Path, value: dict[str, Any]) -> Path:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    return path


def _special_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _hf_configs(out_dir: Path, shape: LlamaShape) -> list[Path]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float16",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": shape.rms_norm_eps,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": shape.hidden_size**-0.5,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    # Meta's sampling defaults for the chat models.
    generation = {
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
        "max_length": shape.max_position_embeddings,
    }
    specials = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        **specials,
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "sp_model_kwargs": {},
        "added_tokens_decoder": {
            str(UNK_ID): {**_special_token("<unk>"), "special": True},
            str(BOS_ID): {**_special_token("<s>"), "special": True},
            str(EOS_ID): {**_special_token("</s>"), "special": True},
        },
    }
    return [
        _write_json(out_dir / "config.json", config),
        _write_json(out_dir / "generation_config.json", generation),
        _write_json(out_dir / "tokenizer_config.json", tokenizer_config),
        _write_json(out_dir / "special_tokens_map.json", {k: _special_token(v) for k, v in specials.items()}),
    ]


def _shards(plan: list[PlannedTensor]) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in plan:
        nbytes = math.prod(tensor.shape) * 2
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _write_safetensors(
    path: Path, tensors: list[PlannedTensor], values: Callable[[PlannedTensor], npt.NDArray[np.float16]]
) -> None:
    # Written by hand because safetensors' own writers need every tensor of a file in memory at once;
    # here only one tensor exists at a time.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * 2
        header[tensor.name] = {
            "dtype": "F16",
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for tensor in tensors:
            values(tensor).astype("<f2", copy=False).tofile(out)


def write_hf(out_dir: Path, shape: LlamaShape, plan: list[PlannedTensor], seed: int) -> list[Path]:
    written = _hf_configs(out_dir, shape)
    shards = _shards(plan)

    def values(tensor: PlannedTensor) -> npt.NDArray[np.float16]:
        return tensor_values(tensor, shape, seed)

    if len(shards) == 1:
        _write_safetensors(out_dir / "model.safetensors", plan, values)
        return [*written, out_dir / "model.safetensors"]
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out_dir / name, shard, values)
        written.append(out_dir / name)
        weight_map.update({tensor.name: name for tensor in shard})
    total = sum(math.prod(t.shape) * 2 for t in plan)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    written.append(_write_json(out_dir / "model.safetensors.index.json", index))
    return written


def _gguf_vocabulary() -> tuple[list[str], list[float], list[int]]:
    import gguf
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=(tokenizer_data() / "tokenizer.model").read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return tokens, scores, types


def write_gguf(path: Path, shape: LlamaShape, plan: list[PlannedTensor], seed: int, *, f32: bool, name: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_description("random weights, Llama 2 architecture and tokenizer")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(shape.vocab_size)
    writer.add_context_length(shape.max_position_embeddings)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_block_count(shape.num_hidden_layers)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_attention_heads)
    writer.add_head_count_kv(shape.num_key_value_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    tokens, scores, types = _gguf_vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    # Norms stay float32 in every llama.cpp file type.
    def dtype(tensor: PlannedTensor) -> type[np.floating[Any]]:
        return np.float32 if f32 or tensor.is_norm else np.float16

    for tensor in plan:
        kind = np.dtype(dtype(tensor))
        writer.add_tensor_info(tensor.gguf_name, tensor.shape, kind, math.prod(tensor.shape) * kind.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in plan:
        values: npt.NDArray[Any] = tensor_values(tensor, shape, seed).astype(dtype(tensor), copy=False)
        if tensor.gguf_name.endswith("attn_q.weight"):
            values = permute_for_gguf(values, shape.num_attention_heads)
        elif tensor.gguf_name.endswith("attn_k.weight"):
            values = permute_for_gguf(values, shape.num_key_value_heads)
        writer.write_tensor_data(values)
    writer.close()
    return path
