"""Dataflows as clusters of processes, started as users start them (``python -m dataflows.launch
NAME --processes N``): exact results, their progress in a consumer group, and a failure that
every process names."""

from __future__ import annotations

import shutil
import signal
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from clients.agents import AgentClient
from dataflows.launch import AgentStack
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import consumer_config, read_topic
from patternflow import free_port
from tests.support.event_counts import counts_by_id, events, expected_counts, prepare, run_to_end, start_dataflow
from tests.support.fraud import VELOCITY, Fraud
from tests.support.processes import wait_for
from tests.support.rag import DOCS, Rag, ask, assert_same_hits, doc_message, top

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


def test_event_counts_killed_as_three_processes_and_resumed_as_one_counts_exactly(
    brokers: str, topic: str, tmp_path: Path
) -> None:
    msgs = events(topic, 200_000)
    prepare(brokers, topic, msgs, partitions=4)
    cluster = start_dataflow(topic, tmp_path, brokers, processes=3)

    def read() -> int:
        return sum(max(0, offset) for offset in committed(brokers, GROUP, topic, 4).values())

    wait_for(lambda: cluster.poll() is not None or read() > 30_000, "the cluster's first snapshots", 120)
    assert cluster.poll() is None, "the cluster ended before the kill; give it more events"
    cluster.send_signal(signal.SIGKILL)  # the launcher; its processes die with it
    cluster.wait()
    run_to_end(start_dataflow(topic, tmp_path, brokers))  # one process: every shard moves to it
    by_id, _ = counts_by_id(brokers, topic)
    assert by_id == expected_counts(msgs)


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


def test_rag_indexes_as_two_processes_and_answers_the_same_after_a_kill_9_and_a_restart_as_three(
    brokers: str, topic: str, tmp_path: Path
) -> None:
    rag = Rag(brokers, topic, tmp_path).start(processes=2)
    try:
        with rag.client() as client:
            rag.wait_ready(client)
            rag.produce(*(doc_message(rag.s.documents_topic, d, *fields) for d, fields in DOCS.items()))
            queries = ("aspirin heart attack", "bone fractures", "memory adolescents")
            wait_for(lambda: len(top(ask(client, "aspirin bone memory", k=4, retriever="bm25"))) == 4, "indexed")
            expected = {q: ask(client, q, k=4, answer=False)["hits"] for q in queries}
            assert (
                top(ask(client, "Does aspirin reduce heart attacks?", k=3, filters={"lang": ["en", "de"]}))[0]
                == "aspirin"
            )
            assert rag.proc is not None
            rag.proc.send_signal(signal.SIGKILL)  # the launcher; its processes die with it
            rag.proc.wait()
            rag.start(processes=3)
            rag.wait_ready(client)
            # The index shards moved between processes; the index is the same.
            assert_same_hits({q: ask(client, q, k=4, answer=False)["hits"] for q in queries}, expected)
    finally:
        if rag.proc is not None and rag.proc.poll() is None:
            rag.proc.kill()


def test_the_agent_loop_runs_as_two_processes_and_after_a_kill_9_as_three(brokers: str, tmp_path: Path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    settings = {"AGENT_TOOLS": "calculator", "AGENT_TOOLS_TOOLS": "calculator"}
    with (
        serve(model, free_port(), latency_ms=20) as url,
        AgentStack(brokers, tmp_path, url, prefix, **settings) as stack,
    ):
        stack.start(processes=2)
        with AgentClient(brokers, topic_prefix=prefix) as agents:
            first = [agents.submit("What is 17 * 23 + 4?", tenant=f"t{i}") for i in range(6)]
            assert all(agents.wait(task, timeout_s=180)["answer"] == "17 * 23 + 4 = 395." for task in first)
            stack.kill()  # the launchers; their processes die with them
            stack.start(processes=3)
            later = [agents.submit("What is 17 * 23 + 4?", tenant=f"t{i}") for i in range(6)]
            results = [agents.wait(task, timeout_s=180) for task in first + later]
        stack.check()
    assert all(r["status"] == "done" and r["answer"] == "17 * 23 + 4 = 395." for r in results)
    assert all(r["turns"] == 2 and r["tool_calls"] == 1 for r in results), "no turn or tool call ran twice"
