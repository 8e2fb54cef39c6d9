"""The ``serve`` command's start-up checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gateway.cli.main import main
from tests.support.databases import PostgresServer
from tests.support.paths import LLAMA2_TOKENIZER_MODEL


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
    config = _config(
        tmp_path, {"name": "llama-2-7b-chat", "backend": "exllamav2", "path": str(model_dir), "template": "llama-2"}
    )
    # A real process, as an operator runs it: the message must be the whole output.
    result = subprocess.run(
        [sys.executable, "-c", "from gateway.cli.main import main; main()", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
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


def serve_in_a_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``llama-gateway serve`` as an operator runs it, in a process of its own."""
    import os

    return subprocess.run(
        [sys.executable, "-c", "from gateway.cli.main import main; main()", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (env or {}),
    )


def assert_one_sentence(result: subprocess.CompletedProcess[str], starts_with: str) -> str:
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(starts_with), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def _scripted_config(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "config.yaml"
    model = {"name": "m", "backend": "scripted", "template": "llama-2", "tokenizer": str(LLAMA2_TOKENIZER_MODEL)}
    path.write_text(yaml.safe_dump({"database_url": database_url, "models": [model]}))
    return path


def test_a_port_in_use_is_one_sentence(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _scripted_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/gw.db")
        result = serve_in_a_process("--config", str(config), "--port", str(port))
    line = assert_one_sentence(result, f"Error: port {port} on 127.0.0.1 is already in use")
    assert "--port" in line


def test_an_unreachable_database_is_one_sentence(tmp_path: Path) -> None:
    config = _scripted_config(tmp_path, "postgresql+asyncpg://postgres@127.0.0.1:1/test")
    line = assert_one_sentence(serve_in_a_process("--config", str(config)), "Error: cannot open the database at")
    assert "LLAMA_GATEWAY_DATABASE_URL" in line


@pytest.mark.postgres
async def test_a_database_behind_its_migrations_is_one_sentence(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = await postgres_server.create(migrated=False)
    try:
        config = _scripted_config(tmp_path, url)
        line = assert_one_sentence(serve_in_a_process("--config", str(config)), "Error: The database at")
        assert "llama-gateway db upgrade" in line
    finally:
        await postgres_server.drop(url)


def test_an_invalid_initial_admin_key_is_one_sentence(tmp_path: Path) -> None:
    config = _scripted_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    result = serve_in_a_process("--config", str(config), env={"LLAMA_GATEWAY_INITIAL_ADMIN_KEY": "sk-short"})
    assert_one_sentence(result, "Error: initial_admin_key (LLAMA_GATEWAY_INITIAL_ADMIN_KEY): a preset key must be")
    assert not (tmp_path / "gw.db").exists()


def test_several_workers_without_redis_is_one_sentence(tmp_path: Path) -> None:
    config = _scripted_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    line = assert_one_sentence(
        serve_in_a_process("--config", str(config), "--workers", "2"), "Error: --workers 2 needs redis_url"
    )
    assert "budget" in line
    assert not (tmp_path / "gw.db").exists()
