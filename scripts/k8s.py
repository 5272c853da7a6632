"""Kubernetes manifests for every long-running dataflow, rendered from one template:
``python -m scripts.k8s`` writes ``deploy/k8s/<dataflow>.yaml``; ``--processes N`` renders
clusters of N processes (the process count is part of every process's command line).

Each dataflow is a Bytewax cluster run by ``python -m dataflows.launch`` (the image's
entry point), one pod per process:

- a **headless Service** gives each pod a stable DNS name, ``<name>-<i>.<name>``, which the
  ``--addresses`` list names (``publishNotReadyAddresses``: the processes must find each other
  before any of them is ready);
- a **StatefulSet** with stable process ids: pod ``<name>-<i>`` runs ``--process-id <i>``;
  ``podManagementPolicy: Parallel`` starts them together, as a cluster starts;
- a **volume per pod** (``volumeClaimTemplates``) at ``/app/var``: the recovery directory (process
  0's holds the recovery partition) and the state directory (the RocksDB shards its workers own)
  outlive the pod, and a rescheduled pod finds them again (docs/deploy.md: keep the process and
  worker counts when state lives on a disk per process);
- the **metrics port as readiness**: ``/metrics`` answers once the dataflow has built;
- **resource requests**: a core per worker, memory by what the dataflow loads.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml

from dataflows.launch import LONG_RUNNING

__all__ = ["DEPLOYMENTS", "K8S", "manifests", "render"]

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
CLUSTER_PORT = 2101
IMAGE = "patternflow:latest"
BROKERS = "kafka:9092"


@dataclass(frozen=True)
class Deployment:
    prefix: str  # of the dataflow's settings in the environment
    memory: str  # requested per process; twice that is the limit
    workers: int = 1


DEPLOYMENTS = {
    "event_counts": Deployment("EVENT_COUNTS_", "512Mi"),
    "online_inference": Deployment("ONLINE_", "2Gi"),  # torch and the models
    "async_jobs": Deployment("JOBS_", "2Gi"),
    "telemetry_anomalies": Deployment("TELEMETRY_", "1Gi"),
    "fraud_detection": Deployment("FRAUD_", "1Gi"),
    "rag": Deployment("RAG_", "3Gi"),  # MiniLM and the index shards
    "agent": Deployment("AGENT_", "1Gi"),
    "agent_tools": Deployment("AGENT_TOOLS_", "512Mi"),
}


def manifests(dataflow: str, processes: int) -> list[dict[str, Any]]:
    """The headless Service and the StatefulSet that run ``dataflow`` as ``processes`` pods."""
    spec = DEPLOYMENTS[dataflow]
    name = dataflow.replace("_", "-")
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "patternflow"}
    metrics_port = next(f.default for f in _fields(dataflow) if f.name == "metrics_port")
    addresses = ";".join(f"{name}-{i}.{name}:{CLUSTER_PORT}" for i in range(processes))
    # The dataflow serves metrics on its port plus its process id (processes sharing a host); a pod
    # has a host of its own, so the port is lowered by the id and every pod serves on the same one.
    launch = (
        f'id="${{HOSTNAME##*-}}"; export {spec.prefix}METRICS_PORT="$(({metrics_port} - id))"; '
        f"exec python -m dataflows.launch {dataflow} --process-id \"$id\" --addresses '{addresses}' "
        f"--workers {spec.workers} --recovery var/recovery/{dataflow}"
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app.kubernetes.io/name": name},
            "ports": [
                {"name": "cluster", "port": CLUSTER_PORT},
                {"name": "metrics", "port": metrics_port},
            ],
        },
    }
    container = {
        "name": "dataflow",
        "image": IMAGE,
        "command": ["sh", "-c", launch],
        "env": [{"name": "KAFKA_BOOTSTRAP_SERVERS", "value": BROKERS}],
        "ports": [
            {"name": "cluster", "containerPort": CLUSTER_PORT},
            {"name": "metrics", "containerPort": metrics_port},
        ],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"}, "periodSeconds": 10},
        "resources": {
            "requests": {"cpu": str(spec.workers), "memory": spec.memory},
            "limits": {"memory": _twice(spec.memory)},
        },
        "volumeMounts": [{"name": "var", "mountPath": "/app/var"}],
    }
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "serviceName": name,
            "replicas": processes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {"terminationGracePeriodSeconds": 30, "containers": [container]},
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "var"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
                }
            ],
        },
    }
    return [service, stateful_set]


def render(dataflow: str, processes: int) -> str:
    header = f"# Rendered by `python -m scripts.k8s --processes {processes}`: edit scripts/k8s.py, not this file.\n"
    return header + yaml.safe_dump_all(manifests(dataflow, processes), sort_keys=False)


def _fields(dataflow: str) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(import_module(f"dataflows.{dataflow}").Settings)


def _twice(memory: str) -> str:
    number, unit = int(memory[:-2]), memory[-2:]
    return f"{number * 2}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.k8s", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes (pods) per dataflow (2)")
    args = parser.parse_args()
    K8S.mkdir(parents=True, exist_ok=True)
    for dataflow in LONG_RUNNING:
        (K8S / f"{dataflow}.yaml").write_text(render(dataflow, args.processes))


if __name__ == "__main__":
    main()
