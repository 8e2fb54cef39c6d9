"""The chart's availability (PDB, HPA), metrics, network policies, ingress and NOTES."""

from __future__ import annotations

from tests.helm.chart import (
    FULLNAME,
    NAMESPACE,
    RELEASE,
    WORKER,
    Helm,
    Manifest,
    check_service_monitor,
    find,
    sets,
)
from tests.support.paths import CHART_DIR

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
