"""The Helm chart: lint, render, validate against the Kubernetes API schemas, check what matters.

Each rendering uses a real ``helm`` (see conftest.py). Manifests are validated with
``kubernetes_validate`` in strict mode (unknown fields are errors); the Prometheus Operator's
ServiceMonitor has no schema there and is checked field by field instead.
"""

from __future__ import annotations

import base64
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
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


# Config, Secrets, migrations


def test_default_config_serves_the_bundled_model_with_sqlite(default_manifests: list[Manifest]) -> None:
    config = config_file(default_manifests, FULLNAME)
    assert config["host"] == "0.0.0.0"
    assert config["port"] == 8000
    assert config["models"] == []
    assert "database_url" not in config
    assert "redis_url" not in config
    deployment = find(default_manifests, "Deployment", FULLNAME)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    gateway = container(deployment, "gateway")
    url = env_of(gateway)["LLAMA_GATEWAY_DATABASE_URL"]["value"]
    assert url == "sqlite+aiosqlite:////var/lib/llama-gateway/llama-gateway.db"
    data = next(m for m in gateway["volumeMounts"] if m["mountPath"] == "/var/lib/llama-gateway")
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert "emptyDir" in volumes[data["name"]]
    # The gateway migrates an SQLite file itself when it opens it.
    assert not [m for m in default_manifests if m["kind"] == "Job"]


def test_gateway_config_lists_the_models(gpu_manifests: list[Manifest]) -> None:
    config = config_file(gpu_manifests, FULLNAME)
    assert config["drain_seconds"] == 45
    by_name = {m["name"]: m for m in config["models"]}
    assert set(by_name) == {"smollm2-135m-instruct", "llama-2-70b-chat"}
    assert by_name["smollm2-135m-instruct"] == gpu_values()["config"]["models"][0]
    remote = by_name["llama-2-70b-chat"]
    assert remote["backend"] == "openai"
    assert remote["template"] == "llama-2"
    assert remote["tokenizer"] == BUNDLED_TOKENIZER
    assert remote["pricing"] == {"input_per_million": "0.65", "output_per_million": "2.75"}
    assert remote["defaults"]["repetition_penalty"] == 1.15
    assert remote["max_concurrency"] == 8


def test_gateway_reaches_the_worker_as_an_openai_backend(gpu_manifests: list[Manifest]) -> None:
    remote = next(m for m in config_file(gpu_manifests, FULLNAME)["models"] if m["backend"] == "openai")
    service = find(gpu_manifests, "Service", WORKER)
    (port,) = service["spec"]["ports"]
    assert remote["options"]["base_url"] == f"http://{WORKER}:{port['port']}/v1"
    assert remote["options"]["model"] == "llama-2-70b-chat"
    worker_pod_labels = find(gpu_manifests, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= worker_pod_labels.items()
    gateway = container(find(gpu_manifests, "Deployment", FULLNAME), "gateway")
    worker = container(find(gpu_manifests, "Deployment", WORKER), "worker")
    key_ref = secret_ref(gateway, remote["options"]["api_key_env"])
    assert key_ref == secret_ref(worker, "LLAMA_GATEWAY_INITIAL_ADMIN_KEY") == (FULLNAME, "worker-api-key")
    assert secret_value(gpu_manifests, *key_ref)


def test_rendered_configs_load_with_gateway_settings(gpu_manifests: list[Manifest], tmp_path: Path) -> None:
    from gateway.settings import load_settings

    for name in (FULLNAME, WORKER):
        path = tmp_path / f"{name}.yaml"
        path.write_text(find(gpu_manifests, "ConfigMap", name)["data"]["config.yaml"])
        settings = load_settings(path, environ={})
        assert settings.host == "0.0.0.0"
        assert settings.port == 8000
        assert settings.models


def test_secrets_feed_the_environment(gpu_manifests: list[Manifest]) -> None:
    values = gpu_values()
    gateway = container(find(gpu_manifests, "Deployment", FULLNAME), "gateway")
    assert env_of(gateway)["LLAMA_GATEWAY_CONFIG"]["value"] == CONFIG_PATH
    for variable, key, expected in (
        ("LLAMA_GATEWAY_DATABASE_URL", "database-url", values["database"]["url"]),
        ("LLAMA_GATEWAY_REDIS_URL", "redis-url", values["redis"]["url"]),
        ("LLAMA_GATEWAY_INITIAL_ADMIN_KEY", "initial-admin-key", None),
    ):
        assert secret_ref(gateway, variable) == (FULLNAME, key)
        value = secret_value(gpu_manifests, FULLNAME, key)
        assert value == expected if expected is not None else len(value) >= 32
    rendered_plainly = yaml.safe_dump([m for m in gpu_manifests if m["kind"] != "Secret"])
    assert values["database"]["url"] not in rendered_plainly
    assert values["redis"]["url"] not in rendered_plainly


def test_migration_job_is_a_hook_that_runs_after_its_secret(gpu_manifests: list[Manifest]) -> None:
    job = find(gpu_manifests, "Job", MIGRATION)
    secret = find(gpu_manifests, "Secret", MIGRATION)
    job_hooks = job["metadata"]["annotations"]
    secret_hooks = secret["metadata"]["annotations"]
    assert job_hooks["helm.sh/hook"] == secret_hooks["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(secret_hooks["helm.sh/hook-weight"]) < int(job_hooks["helm.sh/hook-weight"])
    assert "before-hook-creation" in job_hooks["helm.sh/hook-delete-policy"]
    assert "hook-succeeded" in secret_hooks["helm.sh/hook-delete-policy"]
    migrate = container(job, "db-upgrade")
    assert migrate["args"] == ["db", "upgrade"]
    assert secret_ref(migrate, "LLAMA_GATEWAY_DATABASE_URL") == (MIGRATION, "database-url")
    assert secret_value(gpu_manifests, MIGRATION, "database-url") == gpu_values()["database"]["url"]
    spec = pod_spec(job)
    assert spec["restartPolicy"] == "Never"
    # The chart's ServiceAccount does not exist yet when pre-install hooks run.
    assert spec["serviceAccountName"] == "default"
    assert "initContainers" not in pod_spec(find(gpu_manifests, "Deployment", FULLNAME))


def test_existing_secrets_are_honoured(helm: Helm) -> None:
    manifests = helm.template(
        *sets(
            "database.existingSecret=gw-db",
            "database.existingSecretKey=url",
            "redis.existingSecret=gw-redis",
            "adminKey.existingSecret=gw-admin",
            "adminKey.existingSecretKey=token",
            "gateway.replicaCount=2",
        )
    )
    assert not [m for m in manifests if m["kind"] == "Secret"]
    gateway = container(find(manifests, "Deployment", FULLNAME), "gateway")
    assert secret_ref(gateway, "LLAMA_GATEWAY_DATABASE_URL") == ("gw-db", "url")
    assert secret_ref(gateway, "LLAMA_GATEWAY_REDIS_URL") == ("gw-redis", "redis-url")
    assert secret_ref(gateway, "LLAMA_GATEWAY_INITIAL_ADMIN_KEY") == ("gw-admin", "token")
    job = find(manifests, "Job", MIGRATION)
    assert secret_ref(container(job, "db-upgrade"), "LLAMA_GATEWAY_DATABASE_URL") == ("gw-db", "url")


def test_admin_key_can_be_given_or_left_out(helm: Helm) -> None:
    given = helm.template(*sets("adminKey.value=sk-operator-chosen-0123456789"))
    assert secret_value(given, FULLNAME, "initial-admin-key") == "sk-operator-chosen-0123456789"
    none = helm.template(*sets("adminKey.create=false"))
    assert not [m for m in none if m["kind"] == "Secret"]
    gateway = container(find(none, "Deployment", FULLNAME), "gateway")
    assert "LLAMA_GATEWAY_INITIAL_ADMIN_KEY" not in env_of(gateway)


# Availability, metrics, network


def test_pdb_and_no_hpa_by_default(default_manifests: list[Manifest]) -> None:
    pdb = find(default_manifests, "PodDisruptionBudget", FULLNAME)
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = find(default_manifests, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not [m for m in default_manifests if m["kind"] == "HorizontalPodAutoscaler"]


def test_hpa_and_pdbs_when_enabled(gpu_manifests: list[Manifest]) -> None:
    hpa = find(gpu_manifests, "HorizontalPodAutoscaler", FULLNAME)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert resources == {"cpu", "memory"}
    # The HPA owns the replica count.
    assert "replicas" not in find(gpu_manifests, "Deployment", FULLNAME)["spec"]
    worker_pdb = find(gpu_manifests, "PodDisruptionBudget", WORKER)
    worker_labels = find(gpu_manifests, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    assert worker_pdb["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    gateway_pdb = find(gpu_manifests, "PodDisruptionBudget", FULLNAME)
    assert gateway_pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


def test_pdb_can_be_disabled(helm: Helm) -> None:
    manifests = helm.template(*sets("gateway.pdb.enabled=false"))
    assert not [m for m in manifests if m["kind"] == "PodDisruptionBudget"]


def test_service_monitors(gpu_manifests: list[Manifest], default_manifests: list[Manifest]) -> None:
    monitors = {m["metadata"]["name"]: m for m in gpu_manifests if m["kind"] == "ServiceMonitor"}
    assert set(monitors) == {FULLNAME, WORKER}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        check_service_monitor(monitor, find(gpu_manifests, "Service", name))
    assert not [m for m in default_manifests if m["kind"] == "ServiceMonitor"]


def test_network_policies(gpu_manifests: list[Manifest]) -> None:
    gateway_labels = find(gpu_manifests, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"]
    worker_labels = find(gpu_manifests, "Deployment", WORKER)["spec"]["template"]["metadata"]["labels"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

    worker_policy = find(gpu_manifests, "NetworkPolicy", WORKER)["spec"]
    assert worker_policy["podSelector"]["matchLabels"].items() <= worker_labels.items()
    (rule,) = worker_policy["ingress"]
    peers = rule["from"]
    assert len(peers) == 2
    assert peers[0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert peers[1] == monitoring

    gateway_policy = find(gpu_manifests, "NetworkPolicy", FULLNAME)["spec"]
    assert gateway_policy["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert gateway_policy["policyTypes"] == ["Ingress", "Egress"]
    assert monitoring in gateway_policy["ingress"][0]["from"]
    egress = gateway_policy["egress"]
    assert {"port": 53, "protocol": "UDP"} in egress[0]["ports"]
    to_worker = egress[1]["to"][0]["podSelector"]["matchLabels"]
    assert to_worker.items() <= worker_labels.items()
    assert {p["port"] for rule in egress[2:] for p in rule["ports"]} == {5432, 6379}


def test_ingress_routes_to_the_gateway_service(helm: Helm) -> None:
    manifests = helm.template(*sets("ingress.enabled=true"))
    ingress = find(manifests, "Ingress", FULLNAME)
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}


# NOTES.txt


def test_notes_tell_how_to_get_a_key_and_call_the_api(helm: Helm) -> None:
    done = helm.run("install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"get secret {FULLNAME} -o jsonpath='{{.data.initial-admin-key}}'" in notes
    assert f"exec deploy/{FULLNAME} -c gateway -- llama-gateway keys create --scope admin" in notes
    assert "curl http://localhost:8000/v1/chat/completions" in notes
    assert 'OpenAI(base_url="http://localhost:8000/v1"' in notes
    assert "SQLite" in notes
