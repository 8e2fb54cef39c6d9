"""The tensors of a random-weight Llama 2: shapes per size, names, and their seeded values.

One seed gives one model: ``tensor_values`` draws each tensor from its own stream, so the GGUF and
the Hugging Face files (``gateway.devtools.tiny_model_files``) hold the same weights.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Size = Literal["tiny", "7b", "70b"]
Format = Literal["gguf", "hf"]

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
# Bounds the float32 scratch memory while drawing one large tensor.
_CHUNK_ELEMENTS = 1 << 24


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
