"""The chart's config, Secrets and migration job: what the gateway reads when it starts."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.helm.chart import (
    BUNDLED_TOKENIZER,
    CONFIG_PATH,
    FULLNAME,
    MIGRATION,
    WORKER,
    Helm,
    Manifest,
    config_file,
    container,
    env_of,
    find,
    gpu_values,
    pod_spec,
    secret_ref,
    secret_value,
    sets,
)

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
