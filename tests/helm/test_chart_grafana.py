"""The Grafana dashboard the chart ships: a ConfigMap for Grafana's dashboard sidecar, off by
default, whose every PromQL query names metrics a live gateway really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helm.chart import FULLNAME, KUBE_VERSION, NAMESPACE, Helm, Manifest, find, sets
from tests.support.gateways import bearer, gateway, scripted_model
from tests.support.live import LiveGateway
from tests.support.paths import CHART_DIR
from tests.support.usage_data import chat, migrated_sqlite

DASHBOARD_FILE = CHART_DIR / "dashboards" / "llama-gateway.json"
CONFIGMAP = f"{FULLNAME}-grafana-dashboard"
METRIC_NAME = re.compile(r"\bllama_gateway_[a-z0-9_]+")
# What each metric type adds to its name in the exposition (and so in PromQL).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())
    return loaded


def queries(board: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    found += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return found


def test_the_dashboard_is_off_by_default(default_manifests: list[Manifest]) -> None:
    assert not [m for m in default_manifests if m["metadata"]["name"] == CONFIGMAP]


def test_enabled_it_is_a_configmap_the_grafana_sidecar_loads(helm: Helm) -> None:
    manifests = helm.template(*sets("grafanaDashboard.enabled=true"))
    configmap = find(manifests, "ConfigMap", CONFIGMAP)
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert json.loads(configmap["data"]["llama-gateway.json"]) == dashboard()
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    done = helm.lint(*sets("grafanaDashboard.enabled=true"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_where_and_how_it_is_labelled_can_be_chosen(helm: Helm) -> None:
    values = sets(
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.namespace=monitoring",
        "grafanaDashboard.sidecarLabel=dashboards.example.com/load",
        "grafanaDashboard.sidecarLabelValue=yes",
        "grafanaDashboard.annotations.grafana_folder=LLM",
        "grafanaDashboard.labels.team=platform",
    )
    metadata = find(helm.template(*values), "ConfigMap", CONFIGMAP)["metadata"]
    assert metadata["namespace"] == "monitoring"
    assert metadata["labels"]["dashboards.example.com/load"] == "yes"
    assert metadata["labels"]["team"] == "platform"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["annotations"] == {"grafana_folder": "LLM"}


@pytest.mark.parametrize(
    ("values", "offender"),
    [
        (sets("grafanaDashboard.enabeld=true"), "enabeld"),
        (sets("grafanaDashboard.sidecarLabel=not a label"), "sidecarLabel"),
    ],
)
def test_the_schema_refuses_bad_values(helm: Helm, values: list[str], offender: str) -> None:
    stderr = helm.template_error(*values)
    assert "schema" in stderr
    assert offender in stderr


def test_every_panel_queries_the_chosen_prometheus() -> None:
    board = dashboard()
    assert board["uid"] == "llama-gateway"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert METRIC_NAME.search(target["expr"]), (panel["title"], target["expr"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    url = migrated_sqlite(tmp_path_factory.mktemp("grafana-metrics"))
    with gateway(url, [scripted_model("llama-2-7b-chat", price_in="0.05", price_out="0.25")]) as served:
        yield served


def exported_names(live: LiveGateway) -> set[str]:
    """Every sample name the gateway's /metrics can hold, after a few requests."""
    chat(live, live.admin_key, "llama-2-7b-chat")
    chat(live, live.admin_key, "llama-2-7b-chat", "and again")
    assert httpx.get(f"{live.base_url}/v1/models", headers=bearer("sk-wrong-key-0000000000")).status_code == 401
    text = httpx.get(f"{live.base_url}/metrics", timeout=30).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_the_dashboard_queries_is_exported(live: LiveGateway) -> None:
    exported = exported_names(live)
    used = {name for query in queries(dashboard()) for name in METRIC_NAME.findall(query)}
    assert len(used) >= 15
    assert sorted(used - exported) == []
