"""Fixtures for tests against the real Kafka broker (started by `make test`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

BROKERS = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


@pytest.fixture(scope="session")
def brokers() -> str:
    try:
        AdminClient({"bootstrap.servers": BROKERS}).list_topics(timeout=5)
    except KafkaException as exc:
        pytest.fail(f"no Kafka broker at {BROKERS} ({exc}); start one with 'make kafka-up'")
    return BROKERS


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
