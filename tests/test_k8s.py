"""The Kubernetes manifests (``deploy/k8s/``, rendered by ``python -m scripts.k8s``) checked offline:
no cluster here, so their structure is checked against the launcher and the dataflows' settings."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dataflows.launch import LONG_RUNNING
from scripts.k8s import DEPLOYMENTS, K8S, render
from tests.support.commands import default_port, env_prefix


def manifests(dataflow: str) -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((K8S / f"{dataflow}.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def test_every_long_running_dataflow_has_manifests_rendered_from_the_template() -> None:
    assert set(DEPLOYMENTS) == set(LONG_RUNNING)
    assert {path.stem for path in K8S.glob("*.yaml")} == set(LONG_RUNNING)
    for dataflow in LONG_RUNNING:
        assert (K8S / f"{dataflow}.yaml").read_text() == render(dataflow, 2), "run: python -m scripts.k8s"


@pytest.mark.parametrize("dataflow", LONG_RUNNING)
def test_a_headless_service_and_a_stateful_set_run_the_dataflow_as_a_cluster(dataflow: str) -> None:
    found = manifests(dataflow)
    assert set(found) == {"Service", "StatefulSet"}
    service, sts = found["Service"], found["StatefulSet"]
    name = dataflow.replace("_", "-")
    assert service["metadata"]["name"] == sts["metadata"]["name"] == sts["spec"]["serviceName"] == name
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = sts["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (
        ports["metrics"] == default_port(dataflow) and {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    )
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    (mount,) = container["volumeMounts"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mount == {"name": claim["metadata"]["name"], "mountPath": "/app/var"}, "recovery and state under var/"


@pytest.mark.parametrize("dataflow", LONG_RUNNING)
def test_each_pod_runs_the_launcher_as_its_process_with_every_pods_address(dataflow: str, tmp_path: Path) -> None:
    sts = manifests(dataflow)["StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["sh", "-c"]
    # The pod's command, run with a python that prints what it was given.
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "port=${env_prefix(dataflow)}METRICS_PORT $*"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    name, replicas = dataflow.replace("_", "-"), sts["spec"]["replicas"]
    for i in range(replicas):
        env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "HOSTNAME": f"{name}-{i}"}
        out = subprocess.run(container["command"], env=env, capture_output=True, text=True, check=True).stdout.split()
        assert int(out[0].removeprefix("port=")) + i == default_port(dataflow), "every pod serves metrics on one port"
        assert out[1:4] == ["-m", "dataflows.launch", dataflow]
        args = dict(zip(out[4::2], out[5::2], strict=True))
        assert args["--process-id"] == str(i) and args["--recovery"] == f"var/recovery/{dataflow}"
        addresses = args["--addresses"].split(";")
        assert addresses == [f"{name}-{j}.{name}:{container['ports'][0]['containerPort']}" for j in range(replicas)]
