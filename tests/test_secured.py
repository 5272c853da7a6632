"""The secured tier: a broker that takes only SASL_SSL (SCRAM-SHA-512 over TLS) and refuses what no
ACL allows; clients and a dataflow connect through the client-security profile, each as its own
principal, and no password reaches what they write."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from operators.kafka import (
    KafkaDeliveryError,
    KafkaSecurityError,
    KafkaSourceError,
    ensure_topics,
    partition_count,
    produce,
    read_topic,
)
from tests.support.event_counts import counts_by_id, events, expected_counts, run_to_end, start_dataflow
from tests.support.secured import CANARY, SecuredBroker


def as_user(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def prefix(secured: SecuredBroker) -> str:
    """A topic prefix of one test, and a principal ``client-<prefix>`` allowed to make and use its topics."""
    name = f"s{uuid.uuid4().hex[:8]}"
    secured.add_user(f"client-{name}")
    secured.allow(f"client-{name}", f"{name}.", ["CREATE", "DESCRIBE", "READ", "WRITE"])
    return name


def test_a_wrong_password_fails_fast_naming_the_settings(
    secured: SecuredBroker, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, secured.env(f"client-{prefix}", password=f"{CANARY}-wrong"))
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="KAFKA_SASL_PASSWORD") as caught:
        partition_count(secured.address, f"{prefix}.any", outage_limit_s=120)
    assert time.monotonic() - start < 30, "an authentication failure must not wait out the outage limit"
    assert CANARY not in str(caught.value)


def test_an_untrusted_broker_certificate_fails_fast_naming_the_ca_setting(
    secured: SecuredBroker, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(
        monkeypatch, secured.env(f"client-{prefix}") | {"KAFKA_SSL_CA_LOCATION": "/etc/ssl/certs/ca-certificates.crt"}
    )
    start = time.monotonic()
    with pytest.raises(KafkaSecurityError, match="KAFKA_SSL_CA_LOCATION"):
        partition_count(secured.address, f"{prefix}.any", outage_limit_s=120)
    assert time.monotonic() - start < 30


def test_the_broker_refuses_what_the_acls_do_not_allow(
    secured: SecuredBroker, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from operators.kafka import KafkaMessage, TopicSpec

    # The runtime's topics, made by the runtime's principal; a client may only write tasks.
    runtime, client = f"agent-{prefix}", f"client-{prefix}"
    agent = f"{prefix}agent."
    secured.add_user(runtime)
    secured.allow(runtime, agent, ["CREATE", "DESCRIBE", "READ", "WRITE"])
    secured.allow(client, f"{agent}tasks", ["DESCRIBE", "WRITE"])
    as_user(monkeypatch, secured.env(runtime))
    ensure_topics(secured.address, [TopicSpec(f"{agent}{t}") for t in ("tasks", "tool_results", "human_replies")])

    as_user(monkeypatch, secured.env(client))
    produce(secured.address, [KafkaMessage(b"{}", key=b"t1", topic=f"{agent}tasks")])
    for forged in ("tool_results", "human_replies"):  # no forged tool results or approvals
        with pytest.raises(KafkaDeliveryError, match="TOPIC_AUTHORIZATION_FAILED"):
            produce(secured.address, [KafkaMessage(b"{}", key=b"t1", topic=f"{agent}{forged}")], timeout_s=20)
    with pytest.raises(KafkaSourceError):
        read_topic(secured.address, f"{agent}tool_results", timeout_s=20)


def test_a_dataflow_runs_as_its_own_principal_and_no_password_reaches_its_output(
    secured: SecuredBroker, prefix: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dataflows.event_counts import Settings

    topic, flow = f"{prefix}.events", f"event_counts-{prefix}"
    # Topics made beforehand by the client: the dataflow needs no right to create any.
    as_user(monkeypatch, secured.env(f"client-{prefix}"))
    settings = Settings(input_topic=topic, output_topic=f"{topic}-counts", input_partitions=2)
    ensure_topics(secured.address, settings.topics())
    msgs = events(topic, 2_000)
    produce(secured.address, msgs)
    secured.add_user(flow)
    secured.allow(flow, topic, ["DESCRIBE", "READ", "WRITE"])  # reads events, writes its counts and DLQs
    # librdkafka looks up its consumers' group (offsets live in the snapshots: nothing is committed).
    secured.allow(flow, "patternflow", ["DESCRIBE"], resource="GROUP")

    env = {**os.environ, **secured.env(flow)}
    monkeypatch.setattr(os, "environ", env)  # start_dataflow passes os.environ to the process
    run_to_end(start_dataflow(topic, tmp_path, secured.address))
    monkeypatch.undo()
    as_user(monkeypatch, secured.env(f"client-{prefix}"))
    by_id, _ = counts_by_id(secured.address, topic)
    assert by_id == expected_counts(msgs)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if CANARY.encode() in p.read_bytes()]
