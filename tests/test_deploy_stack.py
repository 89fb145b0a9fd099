"""Plain manifests, Strimzi topics and the Docker compose stack: valid, pinned and loadable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from raft_stream.config import load_config
from tests.chart import KUBE_VERSION, ROOT
from tests.promtool import promtool

DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("variant", ["split", "all-in-one"])
def test_plain_manifests_pass_strict_kubernetes_validation(variant: str) -> None:
    folder = DEPLOY / "manifests" / variant
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((folder / resource).read_text())
        if doc
    ]
    assert {d["kind"] for d in docs} >= {"ConfigMap", "StatefulSet", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_strimzi_topics_pass_their_schema() -> None:
    schema = json.loads((Path(__file__).parent / "schemas" / "kafkatopic.json").read_text())
    topics = [d for d in yaml.safe_load_all((DEPLOY / "kafka" / "topics.yaml").read_text()) if d]
    assert sorted(t["spec"]["topicName"] for t in topics) == [
        "raft.adapters",
        "raft.dead-letter",
        "raft.prompts",
        "raft.samples",
    ]
    for topic in topics:
        jsonschema.validate(topic, schema)


def test_compose_config_loads_with_the_daemon_loader() -> None:
    config = load_config(DEPLOY / "compose" / "config.yaml")
    assert config.kafka.bootstrap_servers == "kafka:9092"
    assert config.store.root.is_relative_to(config.daemon.state_dir)


def test_compose_stack_is_complete_and_pinned() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"kafka", "raft-stream", "prometheus", "grafana"}
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    assert (ROOT / services["raft-stream"]["build"]["dockerfile"]).exists()


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yaml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_yaml_files_pass_yamllint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(ROOT / ".yamllint.yaml"), "deploy", "helm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_sasl_override_reads_its_secrets_from_files_only() -> None:
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    override = yaml.safe_load((DEPLOY / "compose.sasl.yaml").read_text())
    services = override["services"]
    assert set(services) <= set(base) | {"kafka-secrets"}
    assert services["kafka-secrets"]["image"] == base["kafka"]["image"]  # pinned, as the base
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in override["volumes"], f"{name}: {source}"
    for script in (DEPLOY / "compose" / "sasl").glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    kafka_env = services["kafka"]["environment"]
    assert "SECURE:SASL_SSL" in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert not [key for key in kafka_env if "PASSWORD" in key or "JAAS" in key]
    config = load_config(DEPLOY / "compose" / "config.sasl.yaml")
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.kafka.bootstrap_servers == "kafka:9094"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["raft-stream"]["volumes"]}
    assert mounted["/etc/raft-stream/kafka"] == "kafka-secrets"
    assert config.kafka.sasl_password_file == Path("/etc/raft-stream/kafka/password")
    assert config.kafka.ssl_cafile == Path("/etc/raft-stream/kafka/ca.crt")
    assert "environment" not in services["raft-stream"]  # no password in the environment
