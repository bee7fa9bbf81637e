"""The deploy stack, checked by parsing (no container engine here): deploy/docker-compose.yml, the
Dockerfile and deploy/k8s/. Settings are checked against the real configuration schema by loading them
through probewatch.config.load_config, and the Grafana files compose mounts against a fresh export."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.provision import DEFAULT_PROVISIONED_PATH, PASSWORD_ENV, DatasourceSpec, export, settings_from_config
from probewatch.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("latest", "") and bool(re.search(r"\d", tag))


def test_compose_services_images_and_ports() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"kafka", "clickhouse", "grafana", "alertmanager", "probewatch"} <= set(services)
    for name, service in services.items():
        if "image" in service:
            assert _pinned(service["image"]), f"{name}: image {service['image']} is not pinned"
    ports = {name: [str(p) for p in s.get("ports", [])] for name, s in services.items()}
    assert "3000:3000" in ports["grafana"] and "9093:9093" in ports["alertmanager"]
    assert "19092:19092" in ports["kafka"] and "9000:9000" in ports["clickhouse"]
    # Kafka in KRaft mode (no ZooKeeper anywhere).
    kafka = _env(services["kafka"])
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller" and "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka
    assert not any("zookeeper" in k.lower() or "zookeeper" in v.lower() for k, v in kafka.items())
    assert not any("zookeeper" in name for name in services)
    # Grafana gets the ClickHouse plugin and the exported provisioning files.
    grafana = services["grafana"]
    assert _env(grafana)["GF_INSTALL_PLUGINS"].split()[0] == "grafana-clickhouse-datasource"
    assert PASSWORD_ENV in _env(grafana)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    assert mounts["/etc/grafana/provisioning"] == "./compose/grafana/provisioning"
    assert mounts[DEFAULT_PROVISIONED_PATH] == "./compose/grafana/dashboards"
    # Every host path mounted exists in the repository.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} is missing"
    # The worker is built from the Dockerfile at the repository root.
    build = services["probewatch"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"


def test_compose_worker_environment_is_valid_configuration() -> None:
    services = _compose()["services"]
    env = _env(services["probewatch"])
    assert all(k.startswith("PROBEWATCH__") for k in env)
    config = load_config(environ=env)  # unknown keys or bad values raise ConfigError
    assert config.source == "kafka"
    assert config.kafka.bootstrap_servers == "kafka:9092"
    assert config.storage.backend == "clickhouse" and config.storage.clickhouse.host == "clickhouse"
    assert config.alerting.receivers["alertmanager"].url == "http://alertmanager:9093"
    assert config.metrics.host == "0.0.0.0" and config.metrics.port == 9108
    # Consistent with the ClickHouse service it talks to.
    ch = _env(services["clickhouse"])
    assert ch["CLICKHOUSE_DB"] == config.storage.database and ch["CLICKHOUSE_USER"] == config.storage.clickhouse.user
    assert ch["CLICKHOUSE_PASSWORD"] == config.storage.clickhouse.password == _env(services["grafana"])[PASSWORD_ENV]
    advertised = _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{config.kafka.bootstrap_servers}" in advertised
    topics = " ".join(services["kafka-topics"]["command"])
    assert f"--topic {config.kafka.topic} " in topics
    assert f"--topic {config.kafka.effective_dlq_topic} " in topics


def test_compose_grafana_files_match_the_dashboards_code(tmp_path: Path) -> None:
    """deploy/compose/grafana is `probewatch dashboards export` output for the worker's settings."""
    config = load_config(environ=_env(_compose()["services"]["probewatch"]))
    export(tmp_path, settings_from_config(config), DatasourceSpec.from_config(config))
    committed = DEPLOY / "compose" / "grafana"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    for rel in fresh:
        assert (committed / rel).read_text() == (tmp_path / rel).read_text(), (
            f"{rel} is stale: run `probewatch dashboards export deploy/compose/grafana` with the compose "
            "worker's PROBEWATCH__ settings"
        )
    assert config.storage.clickhouse.password not in "".join(p.read_text() for p in committed.rglob("*.yaml"))


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    images = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert images and all(_pinned(i) for i in images), images
    assert re.search(r"^USER\s+\d+", text, re.M), "the worker must not run as root"
    assert 'ENTRYPOINT ["probewatch"]' in text and "EXPOSE 9108" in text
    for package in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]:
        assert f"COPY {package.rstrip('*')} " in text, f"the image lacks the {package} package"


def _k8s() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] == "Kustomization":
                for res in doc["resources"]:
                    assert (K8S / res).exists(), res
                continue
            assert doc["metadata"]["name"], path
            docs[doc["kind"]] = doc
    return docs


def test_k8s_manifests_are_consistent(tmp_path: Path) -> None:
    docs = _k8s()
    assert {"Deployment", "ConfigMap", "Secret", "Service"} <= set(docs)
    deployment, configmap, secret = docs["Deployment"], docs["ConfigMap"], docs["Secret"]
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert _pinned(container["image"])
    env = {e["name"]: e for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}

    # The configuration is the ConfigMap's file at $PROBEWATCH_CONFIG...
    config_path = Path(env["PROBEWATCH_CONFIG"]["value"])
    config_volume = mounts[str(config_path.parent)]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    toml_text = configmap["data"][config_path.name]
    # ... whose secret files are keys of the Secret mounted where the configuration expects them.
    secret_dirs = {p: v["secret"]["secretName"] for p, v in mounts.items() if "secret" in v}
    assert set(secret_dirs.values()) == {secret["metadata"]["name"]}
    for key_path in re.findall(r'_file\s*=\s*"([^"]+)"', toml_text):
        directory, _, key = key_path.rpartition("/")
        assert directory in secret_dirs and key in secret["stringData"], key_path
        local = tmp_path / key
        local.write_text(secret["stringData"][key] + "\n")
        toml_text = toml_text.replace(key_path, str(local))
    local_config = tmp_path / "probewatch.toml"
    local_config.write_text(toml_text)
    other_env = {k: "probewatch-0" for k in env if k.startswith("PROBEWATCH__")}
    assert set(other_env) == {"PROBEWATCH__KAFKA__CLIENT_ID"}
    config = load_config(local_config, environ=other_env)
    assert config.source == "kafka" and config.storage.backend == "clickhouse"
    assert config.storage.clickhouse.password == secret["stringData"]["clickhouse-password"]

    # Probes on /healthz and /readyz of the metrics port, which is the configured one.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == config.metrics.port and config.metrics.host == "0.0.0.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("doc", ["README.md"])
def test_readme_documents_the_stack(doc: str) -> None:
    text = (ROOT / doc).read_text()
    assert "## Run the full stack" in text
    assert "docker compose" in text and "probewatch dashboards push" in text and "deploy/k8s" in text
