"""Rendering the Helm chart with a real ``helm`` and reading what it rendered (the chart tests' helpers)."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import CHART_DIR

GPU_VALUES = CHART_DIR / "ci" / "gpu-values.yaml"
KUBE_VERSION = "1.33.0"
RELEASE = "gw"
NAMESPACE = "llm"
FULLNAME = f"{RELEASE}-llama-gateway"
WORKER = f"{FULLNAME}-worker"
MIGRATION = f"{FULLNAME}-migration"
CONFIG_PATH = "/etc/llama-gateway/config.yaml"
# Where the image (docker/Dockerfile.cpu) installs the gateway's bundled Llama 2 tokenizer.
BUNDLED_TOKENIZER = "/opt/venv/lib/python3.12/site-packages/gateway/data/llama2-tokenizer/tokenizer.model"
# Kinds from CRDs, which kubernetes_validate has no schema for.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    binary: Path
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, env=self.env, timeout=120, check=False
        )

    def lint(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("lint", str(CHART_DIR), "--strict", "--kube-version", KUBE_VERSION, *args)

    def template_raw(self, *args: str) -> subprocess.CompletedProcess[str]:
        chart = ("template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE)
        return self.run(*chart, "--kube-version", KUBE_VERSION, *args)

    def template(self, *args: str) -> list[Manifest]:
        done = self.template_raw(*args)
        if done.returncode != 0:
            pytest.fail(f"helm template {' '.join(args)} failed:\n{done.stderr}")
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    def template_error(self, *args: str) -> str:
        done = self.template_raw(*args)
        assert done.returncode != 0, f"helm template {' '.join(args)} should have failed"
        return done.stderr


def sets(*assignments: str) -> list[str]:
    """``--set`` arguments for helm."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def find(manifests: Sequence[Manifest], kind: str, name: str) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def kinds(manifests: Sequence[Manifest]) -> set[tuple[str, str]]:
    return {(m["kind"], m["metadata"]["name"]) for m in manifests}


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str) -> Manifest:
    return next(c for c in pod_spec(workload)["containers"] if c["name"] == name)


def env_of(container_spec: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container_spec.get("env", [])}


def secret_ref(container_spec: Manifest, variable: str) -> tuple[str, str]:
    ref = env_of(container_spec)[variable]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def secret_value(manifests: Sequence[Manifest], name: str, key: str) -> str:
    return base64.b64decode(find(manifests, "Secret", name)["data"][key]).decode()


def config_file(manifests: Sequence[Manifest], configmap: str) -> Manifest:
    loaded: Manifest = yaml.safe_load(find(manifests, "ConfigMap", configmap)["data"]["config.yaml"])
    return loaded


def gpu_values() -> Manifest:
    loaded: Manifest = yaml.safe_load(GPU_VALUES.read_text())
    return loaded


def check_service_monitor(monitor: Manifest, service: Manifest) -> None:
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "selects no Service of the chart"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports
    assert endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
