"""The Helm chart: lints strictly, renders every documented mode into objects that pass
Kubernetes' schemas (strict) or our CRD schemas, and gives the daemon a config it loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from raft_stream.config import load_config
from tests.chart import CHART, KUBE_VERSION, MODES, ROOT, find, mode_values, objects, render

CUSTOM_SCHEMAS = {
    "ServiceMonitor": "servicemonitor.json",
    "PrometheusRule": "prometheusrule.json",
    "ScaledObject": "scaledobject.json",
    "TriggerAuthentication": "triggerauthentication.json",
    "KafkaTopic": "kafkatopic.json",
    "KafkaUser": "kafkauser.json",
}
SCHEMA_DIR = Path(__file__).parent / "schemas"


def _custom_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / CUSTOM_SCHEMAS[kind]).read_text())
    return schema


def _config_of(mode: str, tmp_path: Path) -> Path:
    (configmap,) = [c for c in find(mode, "ConfigMap") if "config.yaml" in c["data"]]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    return path


@pytest.mark.parametrize("mode", MODES)
def test_chart_lints_strictly(mode: str) -> None:
    report = helm.lint(CHART, mode_values(mode), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("mode", MODES)
def test_every_object_passes_its_schema(mode: str) -> None:
    kinds = set()
    for obj in objects(mode):
        kinds.add(obj["kind"])
        if obj["kind"] in CUSTOM_SCHEMAS:
            jsonschema.validate(obj, _custom_schema(obj["kind"]))
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    assert {"ConfigMap", "Service", "StatefulSet", "NetworkPolicy"} <= kinds


def test_custom_schemas_reject_a_typo() -> None:
    (monitor,) = find("servicemonitor", "ServiceMonitor")
    broken = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _custom_schema("ServiceMonitor"))


def test_strict_kubernetes_validation_rejects_an_unknown_field() -> None:
    (deployment,) = find("default", "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("mode", MODES)
def test_rendered_config_loads_with_the_daemon_loader(mode: str, tmp_path: Path) -> None:
    config = load_config(_config_of(mode, tmp_path))
    values = {**mode_values(mode)}
    assert config.server.port == 9400
    assert config.daemon.state_dir == Path("/var/lib/raft-stream/state")
    expected_bootstrap = values.get("kafka", {}).get(
        "bootstrapServers", "raft-kafka-kafka-bootstrap:9092"
    )
    assert config.kafka.bootstrap_servers == (expected_bootstrap or None)


def test_split_mode_shares_adapters_on_an_rwx_volume(tmp_path: Path) -> None:
    config = load_config(_config_of("default", tmp_path))
    (pvc,) = find("default", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    mounts = {}
    for workload in find("default", "Deployment") + find("default", "StatefulSet"):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        mounts[container["name"]] = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["trainer"]["adapters"]["mountPath"] == str(config.store.root)
    assert mounts["generator"]["adapters"]["readOnly"] is True
    assert mounts["trainer"]["adapters"]["readOnly"] is False


def test_all_in_one_mode_is_one_stateful_pod(tmp_path: Path) -> None:
    config = load_config(_config_of("allinone", tmp_path))
    assert find("allinone", "Deployment") == []
    (sts,) = find("allinone", "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["template"]["spec"]["containers"][0]["args"] == ["run"]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    assert config.store.root.is_relative_to(config.daemon.state_dir)


def test_pods_run_as_non_root_with_a_read_only_root(tmp_path: Path) -> None:
    for mode in MODES:
        for workload in find(mode, "Deployment") + find(mode, "StatefulSet"):
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["automountServiceAccountToken"] is False
            for container in pod["containers"]:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
                writable = {
                    m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")
                }
                assert {"/tmp", "/var/lib/raft-stream/state", "/var/cache/raft-stream"} <= writable


def test_gpu_mode_requests_gpus_on_gpu_nodes() -> None:
    for workload in find("gpu", "Deployment") + find("gpu", "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["containers"][0]["image"].endswith("-gpu")
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_keda_mode_scales_generators_on_prompt_lag() -> None:
    (deployment,) = find("keda", "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA that KEDA creates owns it
    (scaled,) = find("keda", "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["topic"] == "raft.prompts"
    assert trigger["metadata"]["consumerGroup"] == "raft-generators"
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    (auth,) = find("keda", "TriggerAuthentication")
    assert auth["metadata"]["name"] == trigger["authenticationRef"]["name"]


def test_sasl_password_is_a_mounted_secret_file_never_env_or_configmap(tmp_path: Path) -> None:
    config = load_config(_config_of("keda", tmp_path))
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.kafka.ssl_cafile == Path("/etc/raft-stream/kafka-tls/ca/ca.crt")
    assert config.kafka.sasl_password_file == Path("/etc/raft-stream/kafka-sasl/password")
    (deployment,) = find("keda", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-sasl"]
    assert mount == {
        "name": "kafka-sasl",
        "mountPath": "/etc/raft-stream/kafka-sasl",
        "readOnly": True,
    }
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-sasl"]
    assert volume["secret"] == {
        "secretName": "raft-stream",
        "items": [{"key": "password", "path": "password"}],
    }
    assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e]
    assert "password:" not in _config_of("keda", tmp_path).read_text()


def test_each_role_is_its_own_kafka_user_with_only_the_acls_it_needs(tmp_path: Path) -> None:
    users = {u["metadata"]["name"]: u["spec"] for u in find("acls", "KafkaUser")}
    assert set(users) == {"raft-stream-generator", "raft-stream-trainer"}

    def acls(user: str) -> set[tuple[str, str, str]]:
        return {
            (rule["resource"]["type"], rule["resource"]["name"], op)
            for rule in users[user]["authorization"]["acls"]
            for op in rule["operations"]
        }

    generator, trainer = acls("raft-stream-generator"), acls("raft-stream-trainer")
    assert {op for kind, name, op in generator if name == "raft.prompts"} == {"Read", "Describe"}
    assert ("group", "raft-generators", "Read") in generator
    assert ("topic", "raft.samples", "Write") in generator
    assert ("topic", "raft.dead-letter", "Write") in generator
    assert ("topic", "raft.adapters", "Read") in generator
    assert ("topic", "raft.adapters", "Write") not in generator  # cannot announce versions
    assert ("topic", "raft.samples", "Read") in trainer
    assert ("group", "raft-trainer", "Read") in trainer
    assert ("topic", "raft.adapters", "Write") in trainer
    assert ("topic", "raft.dead-letter", "Write") in trainer
    assert not {a for a in trainer if a[1] == "raft.prompts"}  # trainers never see prompts
    assert not {a for a in generator | trainer if a[0] == "cluster" or a[2] == "Create"}
    for workload in find("acls", "Deployment") + find("acls", "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        user = workload["metadata"]["name"]  # raft-stream-generator / raft-stream-trainer
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["RAFT_STREAM_KAFKA__SASL_USERNAME"] == user
        (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-sasl"]
        assert volume["secret"]["secretName"] == user  # the Secret Strimzi creates for it
    config = load_config(_config_of("acls", tmp_path))
    assert config.adapters.signing_key_file == Path("/etc/raft-stream/adapters-signing/key")


def test_kafka_users_with_mutual_tls_mount_their_client_certificates() -> None:
    rendered = render(
        {
            "kafka": {"securityProtocol": "SSL"},
            "strimzi": {"users": {"enabled": True, "authentication": "tls"}},
        }
    )
    (deployment,) = yaml.safe_load_all(rendered["raft-stream/templates/generator-deployment.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-client"]
    assert volume["secret"]["secretName"] == "raft-stream-generator"
    assert not [v for v in pod["volumes"] if v["name"] == "kafka-sasl"]
    config = yaml.safe_load(
        yaml.safe_load(rendered["raft-stream/templates/configmap.yaml"])["data"]["config.yaml"]
    )
    assert config["kafka"]["ssl_certfile"] == "/etc/raft-stream/kafka-tls/client/user.crt"


def test_servicemonitor_selects_the_metrics_service() -> None:
    (monitor,) = find("servicemonitor", "ServiceMonitor")
    services = {s["metadata"]["name"]: s for s in find("servicemonitor", "Service")}
    selected = [
        s
        for s in services.values()
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["raft-stream-metrics"]
    assert selected[0]["spec"]["ports"][0]["name"] == monitor["spec"]["endpoints"][0]["port"]
    assert len(find("servicemonitor", "KafkaTopic")) == 4


def test_chart_prometheus_rules_match_deploy_rules() -> None:
    (rule,) = find("servicemonitor", "PrometheusRule")
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yaml").read_text())
    assert rule["spec"] == rules


def test_values_schema_rejects_broken_values() -> None:
    broken = yaml.safe_load((Path(__file__).parent / "data/broken-values.yaml").read_text())
    with pytest.raises(helm.HelmError) as err:
        render(broken)
    message = str(err.value)
    for location in (
        "/mode",
        "/generation/sampling/k",
        "/generation/maxLoraRank",
        "/kafka/sasl",
        "/server/port",
        "/generator/replicas",
    ):
        assert location in message, message
    report = helm.lint(CHART, broken, strict=True)
    assert report["errors"] or [m for m in report["messages"] if m["severity"] == 3]


def test_split_mode_requires_bootstrap_servers() -> None:
    with pytest.raises(helm.HelmError, match="bootstrapServers"):
        render({"kafka": {"bootstrapServers": ""}})


def test_pinned_adapter_version_loads(tmp_path: Path) -> None:
    rendered = render({"adapters": {"pinnedVersion": 7}})
    (configmap,) = [
        d for d in yaml.safe_load_all(rendered["raft-stream/templates/configmap.yaml"]) if d
    ]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    assert load_config(path).store.pinned_version == 7


def test_notes_tell_how_to_feed_prompts_and_open_the_dashboard() -> None:
    notes = render({})["raft-stream/templates/NOTES.txt"]
    assert (
        "raft-stream produce --config /etc/raft-stream/config.yaml --topic raft.prompts /dev/stdin"
        in notes
    )
    assert "deploy/grafana/raft-stream.json" in notes


def test_notes_warn_that_the_embedded_broker_keeps_data_in_memory_only() -> None:
    embedded = render(mode_values("allinone"))
    external = render(mode_values("allinone") | {"kafka": {"bootstrapServers": "kafka:9092"}})

    def notes(rendered: dict[str, str]) -> str:
        return next(text for name, text in rendered.items() if name.endswith("NOTES.txt"))

    assert "IN MEMORY ONLY" in notes(embedded)
    assert "IN MEMORY ONLY" not in notes(external)
