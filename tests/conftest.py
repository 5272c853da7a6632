"""Fixtures for tests against the real Kafka broker (started by `make test`).

Tests that use the ``brokers`` fixture (directly or through ``topic``) are
marked ``kafka``: ``pytest -m "not kafka"`` runs the rest alone, without a broker.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from patternflow import default_brokers

ROOT = Path(__file__).parent.parent
T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"brokers", "topic", "broker"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.kafka)


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 60, every_s: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture(scope="session")
def brokers() -> str:
    address = default_brokers()
    try:
        AdminClient({"bootstrap.servers": address}).list_topics(timeout=5)
    except KafkaException as exc:
        pytest.fail(f"no Kafka broker at {address} ({exc}); start one with 'make kafka-up'")
    return address


@pytest.fixture
def topic(brokers: str) -> Iterator[str]:
    """A fresh topic name prefix for one test; topics are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    admin = AdminClient({"bootstrap.servers": brokers})
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(name)]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=10).values():
            future.result(timeout=10)


class Logged(subprocess.Popen[bytes]):
    """A process whose output goes to a file: a pipe nobody reads fills up and
    blocks the process (librdkafka logs every failed reconnect during an outage)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            super().__init__(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def output(self, chars: int = 3000) -> str:
        """The end of what it wrote, without librdkafka's connection noise."""
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(line for line in lines if "|rdkafka#" not in line)[-chars:]


class Broker:
    """A broker of this test's own, on its own ports with empty storage, that the test may stop and start."""

    def __init__(self, port: int, data: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        self._env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.address,
            "KAFKA_DATA_DIR": str(data),
            "PYTHON": sys.executable,  # for the script's readiness check
        }

    def _run(self, action: str) -> None:
        out = subprocess.run([str(ROOT / "scripts/kafka.sh"), action], env=self._env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr

    def start(self) -> None:
        self._run("up")

    def stop(self) -> None:
        self._run("down")


@contextlib.contextmanager
def gateway(**settings: Any) -> Iterator[str]:
    """The HTTP gateway (``clients.gateway``) with these settings, in a thread; yields its base URL."""
    import uvicorn

    from clients.gateway import Settings, create_app
    from patternflow import free_port

    port = free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(Settings(port=port, **settings)), port=port, log_level="warning"))
    thread = threading.Thread(target=http.run)
    thread.start()
    try:
        wait_for(lambda: http.started, "the gateway to start", 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout=10)


def free_port_pair() -> int:
    """A port whose next port is free too (the KRaft controller takes it)."""
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no two adjacent free ports")
