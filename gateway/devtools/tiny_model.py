"""Random-weight Llama-2-architecture models with the real Llama 2 tokenizer.

They exercise every backend on the exact ``[INST]`` prompt path (tests, benchmarks, a GPU smoke run)
without downloading Meta's weights: ``tiny`` runs anywhere in a fraction of a second, ``7b`` and ``70b``
(usually with fewer layers) have the real models' tensor shapes, including 70B's grouped-query
attention. One seed gives one model; the GGUF and the Hugging Face files hold the same weights.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import get_args

import click

from gateway.devtools.tiny_model_files import tokenizer_data, write_gguf, write_hf
from gateway.devtools.tiny_model_plan import SIZES, Format, Size, llama_shape, plan_tensors

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
_CLI_FORMATS: dict[str, tuple[Format, ...]] = {"gguf": ("gguf",), "hf": ("hf",), "all": ("gguf", "hf")}


def _write_tokenizer(out_dir: Path, size: Size, seed: int) -> list[Path]:
    data = tokenizer_data()
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
        written += write_hf(out, shape, plan, seed)
    if "gguf" in formats:
        name = f"random-llama-2-{size}-{shape.num_hidden_layers}-layers-seed-{seed}"
        written.append(write_gguf(out / "model.gguf", shape, plan, seed, f32=size == "tiny", name=name))
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
