"""The event-count dataflow end to end, against the real broker, as a user runs it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import orjson
import pytest

from operators.kafka import KafkaMessage, produce, read_topic
from tests.support.event_counts import (
    BASE_MS,
    counts_by_id,
    events,
    expected_counts,
    prepare,
    run_to_end,
    start_dataflow,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("workers", [1, 2])
def test_counts_equal_a_plain_python_count(workers: int, brokers: str, topic: str, tmp_path: Path) -> None:
    msgs = events(topic, 5_000)
    prepare(brokers, topic, msgs)
    run_to_end(start_dataflow(topic, tmp_path, brokers, workers))
    by_id, rows = counts_by_id(brokers, topic)
    assert by_id == expected_counts(msgs)
    assert rows == len(by_id)  # no crash, no duplicates
    assert read_topic(brokers, f"{topic}.late") == []
    assert read_topic(brokers, f"{topic}.dlq") == []


def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(brokers: str, topic: str, tmp_path: Path) -> None:
    msgs = events(topic, 300_000, step_ms=2)
    prepare(brokers, topic, msgs)
    # Tiny pending-write limit: the stores commit many times between snapshots,
    # so at the kill they are ahead of the snapshot and must roll back.
    small_epochs = {"EVENT_COUNTS_STATE_MAX_PENDING_WRITES": "1"}
    proc = start_dataflow(topic, tmp_path, brokers, extra=small_epochs)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if read_topic(brokers, f"{topic}-counts"):
            break
    assert proc.poll() is None, "the dataflow finished before it could be killed; give it more input"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, before_restart = counts_by_id(brokers, topic)
    assert 0 < before_restart < len(expected_counts(msgs))

    run_to_end(start_dataflow(topic, tmp_path, brokers, extra=small_epochs))
    by_id, _ = counts_by_id(brokers, topic)
    assert read_topic(brokers, f"{topic}.late") == []
    assert by_id == expected_counts(msgs)


def malformed(topic: str, n: int) -> list[tuple[KafkaMessage, str]]:
    """Bad messages, each with the reason text the DLQ must give for it."""
    kinds = [
        (b"{not json", "not JSON"),
        (b"[1, 2, 3]", "expected a JSON object"),
        (orjson.dumps({"ts_ms": BASE_MS}), "'key' must be a non-empty string"),
        (orjson.dumps({"key": "user-1", "ts_ms": "yesterday"}), "'ts_ms' must be a non-negative integer"),
        (orjson.dumps({"key": "user-1", "ts_ms": 2**62}), "before year 10000"),
        (orjson.dumps({"key": "user-1", "ts_ms": BASE_MS, "pad": "x" * 2048}), "over the 1024 byte limit"),
        (None, "no value"),
    ]
    out = []
    for i in range(n):
        value, reason = kinds[i % len(kinds)]
        headers = (("trace", str(i).encode()),)
        out.append((KafkaMessage(value, key=f"bad-{i}".encode(), headers=headers, topic=topic), reason))
    return out


def test_malformed_messages_go_to_the_dlq_with_reasons(brokers: str, topic: str, tmp_path: Path) -> None:
    good = events(topic, 3_000)
    bad_msgs = malformed(topic, 1_000)
    # interleaved: every third good message is followed by a bad one
    mixed = []
    for i, msg in enumerate(good):
        mixed.append(msg)
        if i % 3 == 0 and i // 3 < len(bad_msgs):
            mixed.append(bad_msgs[i // 3][0])
    assert len(mixed) == 4_000
    prepare(brokers, topic, mixed)
    run_to_end(start_dataflow(topic, tmp_path, brokers, extra={"EVENT_COUNTS_MAX_MESSAGE_BYTES": "1024"}))

    by_id, _ = counts_by_id(brokers, topic)
    assert by_id == expected_counts(good)
    dlq = read_topic(brokers, f"{topic}.dlq")
    assert len(dlq) == 1_000
    expected = {msg.key: (msg, reason) for msg, reason in bad_msgs}
    assert {m.key for m in dlq} == set(expected)
    for dead in dlq:
        original, reason = expected[dead.key]
        assert dead.value == original.value
        assert reason in (dead.header("dlq.reason") or b"").decode()
        assert dead.header("trace") == original.header("trace")
        assert dead.header("dlq.step") == b"event_counts.parse"
        assert dead.header("dlq.source.topic") == topic.encode()
        assert int(dead.header("dlq.source.offset") or b"-1") >= 0


@pytest.mark.parametrize("value", ["sometimes", "1m"])
def test_an_invalid_setting_stops_the_dataflow_naming_the_variable(value: str, topic: str, tmp_path: Path) -> None:
    never_reached = "127.0.0.1:1"
    proc = start_dataflow(
        topic, tmp_path, never_reached, extra={"EVENT_COUNTS_BOUNDED": value, "EVENT_COUNTS_WINDOW_MS": value}
    )
    assert proc.wait(timeout=60) != 0
    assert "EVENT_COUNTS_" in proc.output() and "is not valid: expected" in proc.output()


def test_resuming_with_another_shard_count_is_refused(brokers: str, topic: str, tmp_path: Path) -> None:
    prepare(brokers, topic, events(topic, 1_000))
    run_to_end(start_dataflow(topic, tmp_path, brokers))
    produce(brokers, events(topic, 100))
    proc = start_dataflow(topic, tmp_path, brokers, extra={"EVENT_COUNTS_STATE_SHARDS": "4"})
    assert proc.wait(timeout=120) != 0
    assert "written with 8 shards, and is now read with 4" in proc.output()
