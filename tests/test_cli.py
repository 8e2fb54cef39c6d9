"""The ``serve`` command's start-up checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from gateway.cli import main


def _config(tmp_path: Path, model: dict[str, object]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"database_url": f"sqlite+aiosqlite:///{tmp_path}/gw.db", "models": [model]}))
    return path


def test_exllamav2_model_on_a_machine_without_it_fails_in_one_sentence(
    tmp_path: Path, llama2_tokenizer_dir: Path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    for name in ("tokenizer.json", "tokenizer.model"):
        (model_dir / name).write_bytes((llama2_tokenizer_dir / name).read_bytes())
    config = _config(tmp_path, {"name": "llama-2-7b-chat", "backend": "exllamav2", "path": str(model_dir),
                                "template": "llama-2"})
    # A real process, as an operator runs it: the message must be the whole output.
    result = subprocess.run(
        [sys.executable, "-c", "from gateway.cli import main; main()", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: model 'llama-2-7b-chat': the exllamav2 backend needs")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "gw.db").exists()  # refused before touching the database


def test_missing_gguf_file_is_refused_before_serving(tmp_path: Path) -> None:
    config = _config(tmp_path, {"name": "m", "backend": "llamacpp", "path": str(tmp_path / "nope.gguf")})
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1
    assert "GGUF file" in result.output
    assert "does not exist" in result.output


def test_invalid_config_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("port: eighty\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    assert "port" in result.output
