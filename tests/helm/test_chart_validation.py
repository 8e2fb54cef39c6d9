"""The Helm chart lints, renders manifests the Kubernetes API accepts (strict ``kubernetes_validate``),
and refuses values that cannot work."""

from __future__ import annotations

import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
import pytest

from tests.helm.chart import (
    CUSTOM_KINDS,
    GPU_VALUES,
    KUBE_VERSION,
    Helm,
    sets,
)

# Lint and schema validation


@pytest.mark.parametrize("values", [[], ["--values", str(GPU_VALUES)]], ids=["default", "gpu"])
def test_lint_passes(helm: Helm, values: list[str]) -> None:
    done = helm.lint(*values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


RENDER_VARIANTS = {
    "default": [],
    "gpu": ["--values", str(GPU_VALUES)],
    "existing-secrets": sets(
        "database.existingSecret=gw-db",
        "redis.existingSecret=gw-redis",
        "adminKey.existingSecret=gw-admin",
        "gateway.replicaCount=3",
    ),
    "worker-own-pvc-and-ingress": sets(
        "database.url=postgresql+asyncpg://u:p@db:5432/g",
        "worker.enabled=true",
        "worker.modelStorage.persistentVolumeClaim.create=true",
        "worker.gatewayModel.tokenizer=/models/tokenizer.model",
        "ingress.enabled=true",
        "ingress.className=nginx",
        "gateway.pdb.minAvailable=1",
        "gateway.autoscaling.enabled=true",
    ),
}


@pytest.mark.parametrize("values", RENDER_VARIANTS.values(), ids=RENDER_VARIANTS.keys())
def test_rendered_manifests_match_the_kubernetes_api(helm: Helm, values: list[str]) -> None:
    manifests = helm.template(*values)
    assert manifests
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{manifest['kind']} {manifest['metadata']['name']} at {list(exc.path)}"
            pytest.fail(f"{where}: {exc.message}")


def test_validator_rejects_unknown_fields() -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targtPort": 8000}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBE_VERSION, strict=True)


SCHEMA_VIOLATIONS = {
    "typo-in-gateway-key": (sets("gateway.replicaCont=2"), "replicaCont"),
    "typo-in-top-level-key": (sets("serviceMonitr.enabled=true"), "serviceMonitr"),
    "typo-in-config-key": (sets("config.drain_second=10"), "drain_second"),
    "typo-in-worker-key": (sets("worker.gpu=2"), "gpu"),
    "database-url-in-configmap": (sets("config.database_url=sqlite://"), "database_url"),
    "bad-log-format": (sets("config.log_format=xml"), "log_format"),
    "unknown-backend": (["--set-json", 'config.models=[{"name": "m", "backend": "vllm"}]'], "backend"),
    "typo-in-model-entry": (
        ["--set-json", 'config.models=[{"name": "m", "backend": "llamacpp", "contxt_length": 4096}]'],
        "contxt_length",
    ),
    "zero-gpus": (sets("worker.gpus=0"), "gpus"),
    "guessable-admin-key": (sets("adminKey.value=hunter2"), "adminKey"),
}


@pytest.mark.parametrize(("values", "offender"), SCHEMA_VIOLATIONS.values(), ids=SCHEMA_VIOLATIONS.keys())
def test_schema_rejects_bad_values(helm: Helm, values: list[str], offender: str) -> None:
    stderr = helm.template_error(*values)
    assert "schema" in stderr
    assert offender in stderr
    linted = helm.lint(*values)
    assert linted.returncode != 0
    assert offender in linted.stdout + linted.stderr


GUARDS = {
    "sqlite-with-replicas": (sets("gateway.replicaCount=2"), "external database"),
    "sqlite-with-autoscaling": (sets("gateway.autoscaling.enabled=true"), "external database"),
    "worker-without-weights": (sets("worker.enabled=true"), "worker.modelStorage"),
    "worker-with-two-weight-sources": (
        sets("worker.enabled=true", "worker.modelStorage.existingClaim=a", "worker.modelStorage.hostPath=/b"),
        "worker.modelStorage",
    ),
}


@pytest.mark.parametrize(("values", "message"), GUARDS.values(), ids=GUARDS.keys())
def test_chart_refuses_settings_that_cannot_work(helm: Helm, values: list[str], message: str) -> None:
    assert message in helm.template_error(*values)
