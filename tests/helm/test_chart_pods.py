"""The chart's pods: non-root with a read-only root, probes, drain-aware grace periods, GPU workers."""

from __future__ import annotations

import math

import pytest

from tests.helm.chart import (
    CONFIG_PATH,
    FULLNAME,
    GPU_VALUES,
    WORKER,
    Helm,
    Manifest,
    config_file,
    container,
    env_of,
    find,
    pod_spec,
    sets,
)

# Pods


@pytest.mark.parametrize("variant", ["default", "gpu"])
def test_every_pod_runs_non_root_with_a_read_only_root(
    variant: str, default_manifests: list[Manifest], gpu_manifests: list[Manifest]
) -> None:
    manifests = default_manifests if variant == "default" else gpu_manifests
    workloads = [m for m in manifests if m["kind"] in ("Deployment", "Job")]
    assert workloads
    for workload in workloads:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            security = c["securityContext"]
            assert security["runAsNonRoot"] is True
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1
            assert tmp[0]["name"] in tmp_volumes


def test_gateway_serves_its_config_on_port_8000_with_probes(gpu_manifests: list[Manifest]) -> None:
    gateway = container(find(gpu_manifests, "Deployment", FULLNAME), "gateway")
    assert gateway["args"] == ["serve", "--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", "8000"]
    assert gateway["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert gateway["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    mount = next(m for m in gateway["volumeMounts"] if m["mountPath"] == CONFIG_PATH)
    volumes = {v["name"]: v for v in pod_spec(find(gpu_manifests, "Deployment", FULLNAME))["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == FULLNAME
    service = find(gpu_manifests, "Service", FULLNAME)
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("drain_seconds", [0.5, 30, 300])
def test_termination_grace_outlasts_the_drain(helm: Helm, drain_seconds: float) -> None:
    manifests = helm.template(
        "--values", str(GPU_VALUES),
        "--set-json", f"config.drain_seconds={drain_seconds}",
        "--set-json", f"worker.config.drain_seconds={drain_seconds}",
    )  # fmt: skip
    for name, prestop_values in ((FULLNAME, "gateway"), (WORKER, "worker")):
        deployment = find(manifests, "Deployment", name)
        spec = pod_spec(deployment)
        main = spec["containers"][0]
        sleep = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
        assert main["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep", prestop_values
        assert spec["terminationGracePeriodSeconds"] > sleep + math.ceil(drain_seconds)


def test_default_grace_period_matches_drain_seconds(default_manifests: list[Manifest]) -> None:
    config = config_file(default_manifests, FULLNAME)
    spec = pod_spec(find(default_manifests, "Deployment", FULLNAME))
    assert spec["terminationGracePeriodSeconds"] > config["drain_seconds"] + 5


def test_gpu_worker_pod(gpu_manifests: list[Manifest]) -> None:
    deployment = find(gpu_manifests, "Deployment", WORKER)
    spec = pod_spec(deployment)
    worker = container(deployment, "worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert worker["resources"]["requests"]["memory"] == "32Gi"
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    models = volumes[mounts["/models"]["name"]]
    assert models["persistentVolumeClaim"]["claimName"] == "llama-2-70b-chat-exl2"
    assert mounts["/models"]["readOnly"] is True
    extension_cache = volumes[mounts[env_of(worker)["TORCH_EXTENSIONS_DIR"]["value"]]["name"]]
    assert extension_cache["persistentVolumeClaim"]["claimName"] == "llama-gateway-torch-extensions"
    assert worker["args"] == ["serve", "--config", CONFIG_PATH, "--host", "0.0.0.0", "--port", "8000"]
    startup = worker["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container(deployment, "worker")["image"].endswith("-cuda")
    config = config_file(gpu_manifests, WORKER)
    (model,) = config["models"]
    assert model["backend"] == "exllamav2"
    assert model["path"].startswith("/models/")
    assert model["options"]["gpu_split"] == [38, 40]


@pytest.mark.parametrize(
    ("storage", "expected"),
    [
        (
            sets("worker.modelStorage.hostPath=/srv/models"),
            {"hostPath": {"path": "/srv/models", "type": "Directory"}},
        ),
        (
            sets("worker.modelStorage.persistentVolumeClaim.create=true"),
            {"persistentVolumeClaim": {"claimName": f"{WORKER}-models", "readOnly": True}},
        ),
    ],
    ids=["hostPath", "chart-pvc"],
)
def test_worker_model_volume_sources(helm: Helm, storage: list[str], expected: Manifest) -> None:
    manifests = helm.template(*sets("worker.enabled=true"), *storage)
    volumes = pod_spec(find(manifests, "Deployment", WORKER))["volumes"]
    models = next(v for v in volumes if v["name"] == "models")
    assert {k: v for k, v in models.items() if k != "name"} == expected
    pvcs = [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    if "persistentVolumeClaim" in expected:
        (pvc,) = pvcs
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    else:
        assert pvcs == []
