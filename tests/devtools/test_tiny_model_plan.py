"""The random Llama 2's plan: tensor shapes per size, seeded values, and GGUF's rotary permutation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.devtools.tiny_model_plan import Size, llama_shape, permute_for_gguf, plan_tensors, tensor_values


def test_weights_depend_on_seed_and_tensor_name() -> None:
    shape = llama_shape("tiny")
    first, second = plan_tensors("tiny")[2], plan_tensors("tiny")[3]
    assert np.array_equal(tensor_values(first, shape, 7), tensor_values(first, shape, 7))
    assert not np.array_equal(tensor_values(first, shape, 7), tensor_values(first, shape, 8))
    assert not np.array_equal(tensor_values(first, shape, 7)[:64], tensor_values(second, shape, 7)[:64])


def _shapes(size: Size, layers: int | None = None) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in plan_tensors(size, layers)}


def test_plan_7b() -> None:
    shapes = _shapes("7b")
    assert len(shapes) == 2 + 32 * 9 + 1
    assert shapes["model.layers.31.self_attn.k_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (11008, 4096)
    # Llama-2-7b's published parameter count.
    assert sum(math.prod(s) for s in shapes.values()) == 6_738_415_616


def test_plan_70b() -> None:
    shapes = _shapes("70b")
    assert shapes["model.layers.79.self_attn.q_proj.weight"] == (8192, 8192)
    assert shapes["model.layers.79.self_attn.k_proj.weight"] == (1024, 8192)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8192, 28672)
    assert sum(math.prod(s) for s in shapes.values()) == 68_976_648_192


def test_plan_layers_override() -> None:
    shapes = _shapes("70b", layers=4)
    assert "model.layers.3.self_attn.v_proj.weight" in shapes
    assert "model.layers.4.self_attn.v_proj.weight" not in shapes
    with pytest.raises(ValueError, match="at least 1"):
        plan_tensors("70b", layers=0)


def test_permutation_matches_llama_cpp_convention() -> None:
    # Per head, llama.cpp wants the rows of the two rotary halves interleaved.
    rows = np.arange(8)[:, None]
    permuted = permute_for_gguf(rows, n_head=2)
    assert permuted[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
