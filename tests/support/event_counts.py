"""dataflows.event_counts as a process: its traffic, a run to the end of a bounded replay, and the counts it wrote."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import orjson

from dataflows.event_counts import Settings
from dataflows.launch import run_command
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from tests.support.processes import Logged

WINDOW_MS = 10_000


BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


KEYS = [f"user-{i}" for i in range(20)]


def events(topic: str, n: int, step_ms: int = 10) -> list[KafkaMessage]:
    msgs = []
    for i in range(n):
        key = KEYS[(i * 7) % len(KEYS)]
        doc = {"key": key, "ts_ms": BASE_MS + i * step_ms}
        msgs.append(KafkaMessage(orjson.dumps(doc), key=key.encode(), topic=topic))
    return msgs


def expected_counts(msgs: list[KafkaMessage]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for msg in msgs:
        doc = orjson.loads(msg.value or b"")
        counts[f"{doc['key']}@{doc['ts_ms'] - doc['ts_ms'] % WINDOW_MS}"] += 1
    return dict(counts)


def start_dataflow(
    topic: str,
    tmp: Path,
    brokers: str,
    workers: int = 1,
    extra: dict[str, str] | None = None,
    *,
    processes: int = 1,
) -> Logged:
    """The dataflow on ``topic``, as one process or, through the launcher, a cluster of ``processes``."""
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": brokers,
        "EVENT_COUNTS_INPUT_TOPIC": topic,
        "EVENT_COUNTS_OUTPUT_TOPIC": f"{topic}-counts",
        "EVENT_COUNTS_WINDOW_MS": str(WINDOW_MS),
        "EVENT_COUNTS_ALLOWED_LATENESS_MS": "60000",
        "EVENT_COUNTS_BOUNDED": "true",
        "EVENT_COUNTS_STATE_DIR": str(tmp / "state"),
        "EVENT_COUNTS_METRICS_PORT": "0",
        **(extra or {}),
    }
    if processes == 1:
        cmd = run_command("dataflows.event_counts:build()", tmp / "recovery", workers=workers)
    else:
        cmd = [sys.executable, "-m", "dataflows.launch", "event_counts", "--recovery", str(tmp / "recovery")]
        cmd += ["--snapshot-s", "1", "--workers", str(workers), "--processes", str(processes)]
    return Logged(cmd, env, tmp / "dataflow.log")


def run_to_end(proc: Logged, timeout_s: float = 240) -> None:
    proc.wait(timeout=timeout_s)
    assert proc.returncode == 0, proc.output()


def counts_by_id(brokers: str, topic: str) -> tuple[dict[str, int], int]:
    rows = [orjson.loads(m.value or b"") for m in read_topic(brokers, f"{topic}-counts")]
    by_id: dict[str, int] = {}
    for row in rows:
        # a duplicate after recovery must repeat the same id with the same count
        assert by_id.setdefault(row["id"], row["count"]) == row["count"], row
    return by_id, len(rows)


def prepare(brokers: str, topic: str, msgs: list[KafkaMessage], partitions: int = 3) -> None:
    settings = Settings(input_topic=topic, output_topic=f"{topic}-counts", input_partitions=partitions)
    ensure_topics(brokers, settings.topics())
    produce(brokers, msgs)
