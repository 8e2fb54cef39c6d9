"""The GPU check's files parse, and its wheel list pins every wheel once."""

from __future__ import annotations

import py_compile
import subprocess
from pathlib import Path

from tests.support.paths import REPO_ROOT

GPU_CHECK = REPO_ROOT / "bench" / "gpu"


def test_gpu_check_scripts_parse(tmp_path: Path) -> None:
    py_compile.compile(str(GPU_CHECK / "check.py"), cfile=str(tmp_path / "check.pyc"), doraise=True)
    for script in ("run_check.sh", "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", str(GPU_CHECK / script)], check=True)


def test_wheel_list_pins_every_wheel() -> None:
    lines = [line.split("#")[0].strip() for line in (GPU_CHECK / "wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert "exllamav2==0.3.2" in pins
    names = [pin.split("==")[0].lower().replace("_", "-") for pin in pins]
    assert all(pin.count("==") == 1 for pin in pins)
    assert len(names) == len(set(names)), "one version of each wheel"
    assert {"litestar", "msgspec", "uvicorn", "structlog", "sqlalchemy", "aiosqlite", "openai"} <= set(names)
    assert not {"torch", "numpy", "transformers", "tokenizers"} & set(names), "already on the GPU machine"
