"""Dataflows as clusters of processes, started as users start them (``python -m dataflows.launch
NAME --processes N``): exact results, their progress in a consumer group, and a failure that
every process names."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from operators.kafka import consumer_config, read_topic
from tests.support.event_counts import counts_by_id, events, expected_counts, prepare, run_to_end, start_dataflow
from tests.support.fraud import VELOCITY, Fraud
from tests.support.processes import wait_for

pytestmark = pytest.mark.e2e

GROUP = "patternflow.event_counts"  # the group event_counts commits its snapshots' offsets to


def commit(brokers: str, group: str, offsets: list[TopicPartition]) -> None:
    consumer = Consumer(consumer_config(brokers, {"group.id": group}))
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def committed(brokers: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """What ``kafka-consumer-groups.sh --describe`` shows as the group's offsets in ``topic``."""
    query = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
    admin = AdminClient({"bootstrap.servers": brokers})  # alive until its answer comes
    (future,) = admin.list_consumer_group_offsets([query]).values()
    return {tp.partition: tp.offset for tp in future.result(timeout=10).topic_partitions}


def ends(brokers: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer(consumer_config(brokers))
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        consumer.close()


def test_event_counts_as_two_processes_counts_exactly_and_every_process_names_a_lost_state_directory(
    brokers: str, topic: str, tmp_path: Path
) -> None:
    msgs = events(topic, 20_000)
    prepare(brokers, topic, msgs, partitions=4)
    commit(brokers, GROUP, [TopicPartition(topic, p, 3) for p in range(4)])  # offsets a start must not use
    run_to_end(start_dataflow(topic, tmp_path, brokers, processes=2))
    by_id, rows = counts_by_id(brokers, topic)
    assert by_id == expected_counts(msgs) and rows == len(by_id)
    # Each process committed its partitions' offsets at its snapshots: the group shows the input read to its end.
    assert committed(brokers, GROUP, topic, 4) == ends(brokers, topic, 4)

    # One shard's state directory is lost: the process that owns the shard cannot resume it.
    (shard,) = [d for d in (tmp_path / "state").glob("*/shard-3")]
    shutil.rmtree(shard)
    cluster = start_dataflow(topic, tmp_path, brokers, processes=2)
    cluster.wait(timeout=120)
    log = cluster.log.read_text(errors="replace")
    assert cluster.returncode == 1, cluster.output()
    for process in ("[0]", "[1]"):  # each process's own lines name the first cause
        lines = [line for line in log.splitlines() if line.startswith(process)]
        assert any("the first cause: process" in line and "StateRecoveryError" in line for line in lines), log[-4000:]
    assert "the state directory was lost" in log
    assert "exited first with status 1" in log


def test_fraud_detection_killed_as_two_processes_and_resumed_as_three_scores_as_one_process_does(
    fraud: Fraud,
) -> None:
    fraud.feed(12_000)
    decisions = fraud.topics["decisions"]
    clean = fraud.start("clean", decisions=f"{decisions}-clean")
    assert clean.wait(timeout=300) == 0, clean.output()
    crashed = fraud.start("cluster", processes=2)
    wait_for(lambda: crashed.poll() is not None or len(read_topic(fraud.brokers, decisions)) > 5_000, "decisions", 120)
    assert crashed.poll() is None, "the cluster ended before the kill; give it more payments"
    crashed.send_signal(signal.SIGKILL)  # the launcher; its processes die with it
    crashed.wait()
    resumed = fraud.start("cluster", processes=3)  # on one machine: one state directory, shards move freely
    assert resumed.wait(timeout=300) == 0, resumed.output()
    expected, got = fraud.decisions(f"{decisions}-clean"), fraud.decisions()
    assert got.keys() == expected.keys() and len(got) == 12_000
    for pid, want in expected.items():
        assert {k: got[pid]["features"][k] for k in VELOCITY} == {k: want["features"][k] for k in VELOCITY}, pid
