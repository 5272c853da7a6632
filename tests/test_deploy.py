"""docker-compose.yml cannot run here (no Docker engine): these tests keep it in
step with the local broker's configuration, the pom and the dataflows' ports."""

from __future__ import annotations

import dataclasses
import pkgutil
import re
import subprocess
import sys
from importlib import import_module

import pytest
import yaml

from clients.agents import AgentTopics
from dataflows.agent.program import topic_specs
from dataflows.event_counts import Settings
from dataflows.launch import LONG_RUNNING
from operators.failures import FAILURES_TOPIC
from scripts.kafka_acls import grants, load
from tests.support.commands import DATAFLOWS, default_port, env_prefix
from tests.support.processes import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def properties() -> dict[str, str]:
    lines = (ROOT / "deploy/kafka/server.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def without_hosts(value: str) -> str:
    """The value with hosts and compose's listener for containers (DOCKER) left out."""
    value = value.replace("@PORT@", "9092").replace("@CONTROLLER_PORT@", "9093")
    value = ",".join(part for part in value.split(",") if not part.startswith("DOCKER:"))
    return re.sub(r"(//|@)[A-Za-z0-9_.@-]*:", r"\1:", value)


def test_compose_broker_has_every_local_broker_setting_with_the_same_value() -> None:
    env = COMPOSE["services"]["kafka"]["environment"]
    local = properties()
    assert set(env) == {"KAFKA_" + key.upper().replace(".", "_") for key in local}
    for key, value in local.items():
        if "@DATA@" in value:
            continue
        assert without_hosts(str(env["KAFKA_" + key.upper().replace(".", "_")])) == without_hosts(value), key


def test_compose_broker_is_the_version_the_local_broker_runs() -> None:
    pom = (ROOT / "scripts/kafka/pom.xml").read_text()
    version = re.search(r"<kafka.version>(.+)</kafka.version>", pom).group(1)  # type: ignore[union-attr]
    assert COMPOSE["services"]["kafka"]["image"] == f"apache/kafka:{version}"


def test_compose_publishes_the_default_bootstrap_port() -> None:
    port = Settings().kafka_bootstrap_servers.rsplit(":", 1)[1]
    assert f"{port}:{port}" in COMPOSE["services"]["kafka"]["ports"]


def scrape_configs() -> dict[str, dict[str, list[str]]]:
    """Per Prometheus job, each dataflow label's targets."""
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    return {
        job["job_name"]: {sc["labels"]["dataflow"]: sc["targets"] for sc in job["static_configs"]}
        for job in config["scrape_configs"]
    }


PATTERNS = {"online", "batch", "streaming", "rag", "agent"}


def service(dataflow: str) -> str:
    return dataflow.replace("_", "-")


def test_every_dataflow_module_is_deployed() -> None:
    modules = {m.name for m in pkgutil.iter_modules([str(ROOT / "dataflows")])} - {"launch"}
    assert modules == set(DATAFLOWS)


def test_prometheus_scrapes_every_dataflow_by_service_name_and_on_the_host_in_its_patterns_job() -> None:
    jobs = scrape_configs()
    assert set(jobs) == PATTERNS, "a job per pattern"
    scraped = {dataflow: targets for by_dataflow in jobs.values() for dataflow, targets in by_dataflow.items()}
    assert sorted(scraped) == DATAFLOWS
    for dataflow, targets in scraped.items():
        port = default_port(dataflow)
        assert targets == [f"{service(dataflow)}:{port}", f"host.docker.internal:{port}"], dataflow
    assert set(jobs["agent"]) == {"agent", "agent_tools"}, "the runtime and its tool workers"
    mounted = COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_compose_runs_the_dataflow_from_the_image_with_its_state_on_a_volume(dataflow: str) -> None:
    svc = COMPOSE["services"][service(dataflow)]
    assert svc["build"] == "." and svc["image"] == "patternflow"
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    if dataflow == "batch_inference":
        assert svc["entrypoint"] == ["python", "-m", "dataflows.batch_inference"] and svc["profiles"] == ["jobs"]
    else:
        assert svc["command"] == [dataflow], "the image's entry point: python -m dataflows.launch"
        assert svc["profiles"] == (["agent"] if dataflow.startswith("agent") else ["dataflows"])
    volume = f"{service(dataflow)}-var"
    assert svc["volumes"] == [f"{volume}:/app/var"], "recovery and state under var/, on the service's volume"
    assert volume in COMPOSE["volumes"]


@pytest.mark.parametrize("dataflow", DATAFLOWS)
def test_compose_sets_only_settings_the_dataflow_reads(dataflow: str) -> None:
    env = COMPOSE["services"][service(dataflow)]["environment"]
    prefix = env_prefix(dataflow)
    fields = dataclasses.fields(import_module(f"dataflows.{dataflow}").Settings)
    known = {prefix + f.name.upper() for f in fields} | {"KAFKA_BOOTSTRAP_SERVERS", f"{prefix}LLM_API_KEY"}
    assert set(env) <= known, set(env) - known
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092", "the broker's listener for containers"
    assert "DOCKER://kafka:29092" in COMPOSE["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]


def test_the_image_holds_every_package_and_launches_only_long_running_dataflows() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[(.*)\]", pyproject).group(1)  # type: ignore[union-attr]
    for package in re.findall(r'"(\w+)\*"', include):
        assert f"COPY {package} {package}" in dockerfile, package
    assert 'ENTRYPOINT ["python", "-m", "dataflows.launch"]' in dockerfile
    out = subprocess.run(
        [sys.executable, "-m", "dataflows.launch", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert all(name in out.stdout for name in LONG_RUNNING)


def test_grafana_datasource_points_at_the_compose_prometheus() -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (prometheus,) = ds["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert "9090:9090" in COMPOSE["services"]["prometheus"]["ports"]


def test_dashboards_query_only_metrics_the_dataflows_export() -> None:
    from prometheus_client import REGISTRY

    import operators.metrics  # noqa: F401  (registers the metrics)

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {m.name + s for m in REGISTRY.collect() for s in suffixes.get(m.type, [""])}
    dashboards = list((ROOT / "deploy/grafana/dashboards").glob("*.json"))
    assert {d.stem for d in dashboards} == PATTERNS, "a dashboard per pattern"
    for d in dashboards:
        assert set(re.findall(r'job=\\"(\w+)\\"', d.read_text())) == {d.stem}, "each selects its own job"
    queried = {name for d in dashboards for name in re.findall(r"patternflow_[a-z_]+", d.read_text())}
    assert dashboards and queried
    assert queried <= exported, queried - exported


def test_the_acl_matrix_grants_each_dataflow_the_topics_it_declares_and_nobody_more_than_it_needs() -> None:
    granted = grants(load())

    def may(principal: str, operation: str, topic: str) -> bool:
        return any(
            g.principal == principal
            and g.resource == "TOPIC"
            and g.operation == operation
            and (topic.startswith(g.name) if g.prefixed else topic == g.name)
            for g in granted
        )

    declared = {
        name: [spec.name for spec in import_module(f"dataflows.{name}").Settings().topics()]
        for name in ("event_counts", "online_inference", "async_jobs", "telemetry_anomalies", "fraud_detection", "rag")
    }
    for name in ("agent", "agent_tools"):  # the runtime's, and its tool workers'
        declared[name] = [spec.name for spec in topic_specs(AgentTopics(), of=name)]
    for name, topics in declared.items():
        for topic in topics:
            assert any(may(name, op, topic) for op in ("READ", "WRITE")), (name, topic)
    for name in LONG_RUNNING:  # as a cluster, its processes tell each other their first failure there
        assert may(name, "READ", FAILURES_TOPIC) and may(name, "WRITE", FAILURES_TOPIC), name
    # Topics are made beforehand: nobody creates, alters or deletes anything.
    assert {g.operation for g in granted} == {"READ", "WRITE", "DESCRIBE", "DESCRIBE_CONFIGS"}
    # No forged tool results or approvals, and a client reads no dataflow's input.
    assert not may("client", "WRITE", "agent.tool_results") and not may("client", "WRITE", "agent.human_replies")
    assert may("reviewer", "WRITE", "agent.human_replies")
    assert not any(may("client", "READ", t) for t in ("rag.documents", "payments", "agent.tasks", "jobs.submit"))
