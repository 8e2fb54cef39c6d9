"""Random-weight Llama-2-architecture models with the real Llama 2 tokenizer.

They exercise every backend on the exact ``[INST]`` prompt path (tests, benchmarks, a GPU smoke run)
without downloading Meta's weights: ``tiny`` runs anywhere in a fraction of a second, ``7b`` and ``70b``
(usually with fewer layers) have the real models' tensor shapes, including 70B's grouped-query
attention. One seed gives one model; the GGUF and the Hugging Face files hold the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal, get_args

import click
import numpy as np
import numpy.typing as npt

Size = Literal["tiny", "7b", "70b"]
Format = Literal["gguf", "hf"]

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
MAX_SHARD_BYTES = 4 << 30
# Bounds the float32 scratch memory while drawing one large tensor.
_CHUNK_ELEMENTS = 1 << 24
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_CLI_FORMATS: dict[str, tuple[Format, ...]] = {"gguf": ("gguf",), "hf": ("hf",), "all": ("gguf", "hf")}


@dataclass(frozen=True, slots=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZES: dict[Size, LlamaShape] = {
    # Head size 64 and widths in multiples of 128 suit the GPU kernels; two KV heads per four query
    # heads give the tiny model 70B's grouped-query attention.
    "tiny": LlamaShape(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "7b": LlamaShape(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "70b": LlamaShape(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


def llama_shape(size: Size, layers: int | None = None) -> LlamaShape:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if layers is None:
        return SIZES[size]
    if layers < 1:
        raise ValueError("layers must be at least 1")
    return dataclasses.replace(SIZES[size], num_hidden_layers=layers)


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    """The Hugging Face name (``model.layers.0.self_attn.q_proj.weight``)."""
    gguf_name: str
    shape: tuple[int, ...]
    """Numpy order, ``(out_features, in_features)`` for projections, as both formats store it."""

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1


def plan_tensors(size: Size = "tiny", layers: int | None = None) -> list[PlannedTensor]:
    """Every tensor of the model, in file order, without allocating any of them."""
    shape = llama_shape(size, layers)
    hidden, inter, vocab = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * shape.head_dim
    plan = [PlannedTensor("model.embed_tokens.weight", "token_embd.weight", (vocab, hidden))]
    for n in range(shape.num_hidden_layers):
        hf, gg = f"model.layers.{n}.", f"blk.{n}."
        plan += [
            PlannedTensor(hf + "input_layernorm.weight", gg + "attn_norm.weight", (hidden,)),
            PlannedTensor(hf + "self_attn.q_proj.weight", gg + "attn_q.weight", (hidden, hidden)),
            PlannedTensor(hf + "self_attn.k_proj.weight", gg + "attn_k.weight", (kv, hidden)),
            PlannedTensor(hf + "self_attn.v_proj.weight", gg + "attn_v.weight", (kv, hidden)),
            PlannedTensor(hf + "self_attn.o_proj.weight", gg + "attn_output.weight", (hidden, hidden)),
            PlannedTensor(hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", (hidden,)),
            PlannedTensor(hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", (inter, hidden)),
            PlannedTensor(hf + "mlp.up_proj.weight", gg + "ffn_up.weight", (inter, hidden)),
            PlannedTensor(hf + "mlp.down_proj.weight", gg + "ffn_down.weight", (hidden, inter)),
        ]
    plan += [
        PlannedTensor("model.norm.weight", "output_norm.weight", (hidden,)),
        PlannedTensor("lm_head.weight", "output.weight", (vocab, hidden)),
    ]
    return plan


def tensor_values(tensor: PlannedTensor, shape: LlamaShape, seed: int) -> npt.NDArray[np.float16]:
    """The weights of one tensor in float16, the same whichever file is written or in what order.

    Norms are 1. Other weights are normal with std ``hidden_size ** -0.5``, which keeps activations at
    unit scale so that attention is far from uniform and a wrong q/k layout changes the output.
    """
    if tensor.is_norm:
        return np.ones(tensor.shape, dtype=np.float16)
    rng = np.random.default_rng([seed, zlib.crc32(tensor.name.encode())])
    std = shape.hidden_size**-0.5
    values = np.empty(tensor.shape, dtype=np.float16)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // tensor.shape[1])
    for start in range(0, tensor.shape[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, tensor.shape[0])
        values[start:stop] = rng.standard_normal((stop - start, tensor.shape[1]), dtype=np.float32) * std
    return values


def permute_for_gguf(weights: npt.NDArray[Any], n_head: int) -> npt.NDArray[Any]:
    """llama.cpp's row order for a q or k projection (``LlamaModel.permute`` in convert_hf_to_gguf.py).

    Hugging Face rotates the two halves of each head; llama.cpp rotates adjacent pairs. Writing the
    GGUF through this permutation makes both files compute the same function.
    """
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tokenizer_data() -> Traversable:
    return resources.files("gateway") / "data" / "llama2-tokenizer"


def _write_tokenizer(out_dir: Path, size: Size, seed: int) -> list[Path]:
    data = _tokenizer_data()
    written = []
    for name in _TOKENIZER_FILES:
        (out_dir / name).write_bytes((data / name).read_bytes())
        written.append(out_dir / name)
    readme = out_dir / "README.md"
    readme.write_text(
        f"# Random-weight Llama 2 ({size}, seed {seed})\n\n"
        "Written by `llama-gateway tiny-model`: the Llama 2 architecture with random weights, for tests.\n"
        "It produces no meaningful text.\n\n"
        + (data / "README.md").read_text(encoding="utf-8").replace("# Llama 2 tokenizer", "## Tokenizer", 1),
        encoding="utf-8",
    )
    written.append(readme)
    return written


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


def _write_hf(out_dir: Path, shape: LlamaShape, plan: list[PlannedTensor], seed: int) -> list[Path]:
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

    sp = sentencepiece.SentencePieceProcessor(model_proto=(_tokenizer_data() / "tokenizer.model").read_bytes())
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


def _write_gguf(path: Path, shape: LlamaShape, plan: list[PlannedTensor], seed: int, *, f32: bool, name: str) -> Path:
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


def write_tiny_model(
    out_dir: str | Path,
    *,
    size: Size = "tiny",
    layers: int | None = None,
    seed: int = 0,
    formats: Collection[Format] = ("gguf", "hf"),
) -> list[Path]:
    """Write the model into ``out_dir`` and return the files written.

    Always the tokenizer (``tokenizer.model``, ``tokenizer.json``, a README with its licence note);
    ``gguf``: ``model.gguf`` (float32 for ``tiny``, else float16); ``hf``: ``config.json``,
    float16 safetensors (sharded with an index when over 4 GiB) and the tokenizer configs.
    """
    unknown = set(formats) - set(get_args(Format))
    if unknown:
        raise ValueError(f"unknown format {sorted(unknown)[0]!r}; choose from {', '.join(get_args(Format))}")
    shape = llama_shape(size, layers)
    plan = plan_tensors(size, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_tokenizer(out, size, seed)
    if "hf" in formats:
        written += _write_hf(out, shape, plan, seed)
    if "gguf" in formats:
        name = f"random-llama-2-{size}-{shape.num_hidden_layers}-layers-seed-{seed}"
        written.append(_write_gguf(out / "model.gguf", shape, plan, seed, f32=size == "tiny", name=name))
    return written


@click.command("tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--size",
    type=click.Choice(list(SIZES)),
    default="tiny",
    show_default=True,
    help="Tensor shapes: a tiny model, or those of Llama 2 7B or 70B.",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Number of transformer layers instead of the size's own.",
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(list(_CLI_FORMATS)),
    default="all",
    show_default=True,
    help="gguf for llama.cpp, hf (safetensors + config.json) for ExLlamaV2, or both.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def tiny_model_command(out_dir: Path, size: Size, layers: int | None, format_: str, seed: int) -> None:
    """Write a random-weight Llama 2 model with the real Llama 2 tokenizer into OUT_DIR."""
    for path in write_tiny_model(out_dir, size=size, layers=layers, seed=seed, formats=_CLI_FORMATS[format_]):
        click.echo(path)
