"""docker-compose.yml cannot run here (no Docker engine): these tests keep it in
step with the local broker's configuration, the pom and the dataflows' ports."""

from __future__ import annotations

import dataclasses
import re
from importlib import import_module
from pathlib import Path

import yaml

from dataflows.event_counts import Settings
from dataflows.online_inference import Settings as OnlineSettings

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def properties() -> dict[str, str]:
    lines = (ROOT / "deploy/kafka/server.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def without_hosts(value: str) -> str:
    value = value.replace("@PORT@", "9092").replace("@CONTROLLER_PORT@", "9093")
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


def targets_by_job() -> dict[str, list[str]]:
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]] for job in config["scrape_configs"]
    }


def default_port(dataflow: str) -> int:
    settings = import_module(f"dataflows.{dataflow}").Settings
    (port,) = [f.default for f in dataclasses.fields(settings) if f.name == "metrics_port"]
    assert isinstance(port, int)
    return port


def test_prometheus_scrapes_every_dataflow_metrics_port() -> None:
    targets = targets_by_job()
    assert targets["event_counts"] == [f"host.docker.internal:{Settings().metrics_port}"]
    assert targets["online_inference"] == [f"host.docker.internal:{OnlineSettings().metrics_port}"]
    assert targets["rag"] == [f"host.docker.internal:{default_port('rag')}"]
    ports = (default_port("agent"), default_port("agent_tools"))
    assert targets["agent"] == [f"host.docker.internal:{port}" for port in ports], "the runtime and its tool workers"
    mounted = COMPOSE["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounted


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
    assert {d.stem for d in dashboards} == set(targets_by_job()), "a dashboard per scraped dataflow"
    queried = {name for d in dashboards for name in re.findall(r"patternflow_[a-z_]+", d.read_text())}
    assert dashboards and queried
    assert queried <= exported, queried - exported
