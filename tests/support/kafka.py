"""Fixtures for tests against the real Kafka broker (started by ``make test``), and a broker of a test's own.

Tests that use the ``brokers`` fixture (directly or through ``topic``) are
marked ``kafka``: ``pytest -m "not kafka"`` runs the rest alone, without a broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from operators.kafka import admin_config
from patternflow import default_brokers
from tests.support.processes import ROOT

__all__ = ["Broker", "brokers", "topic"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"brokers", "topic", "broker"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


@pytest.fixture(scope="session")
def brokers() -> str:
    address = default_brokers()
    try:
        AdminClient(admin_config(address)).list_topics(timeout=5)
    except KafkaException as exc:
        pytest.fail(f"no Kafka broker at {address} ({exc}); start one with 'make kafka-up'")
    return address


@pytest.fixture
def topic(brokers: str) -> Iterator[str]:
    """A fresh topic name prefix for one test; topics are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    admin = AdminClient(admin_config(brokers))
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name)]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=10).values():
            future.result(timeout=10)


class Broker:
    """A broker of this test's own, on its own ports with empty storage, that the test may stop and start."""

    def __init__(self, port: int, data: Path, secured: Path | None = None) -> None:
        self.address = f"127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.address,
            "KAFKA_DATA_DIR": str(data),
            "PYTHON": sys.executable,  # for the script's readiness check
        }
        if secured is not None:  # the secured broker: its CA and admin password are made there
            self._env["KAFKA_SECURED_DIR"] = str(secured)

    def _run(self, action: str) -> None:
        out = subprocess.run([str(ROOT / "scripts/kafka.sh"), action], env=self._env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr

    def start(self) -> None:
        self._run("up")

    def stop(self) -> None:
        self._run("down")
