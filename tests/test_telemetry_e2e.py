"""Telemetry anomaly detection through the running dataflow: quality, bad events, kill -9."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import orjson
import pytest

from dataflows.launch import run_command
from dataflows.telemetry_anomalies import Settings, parse_metric
from models.quality import roc_auc
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from scripts.evaluate_anomalies import evaluate, shuttle
from tests.support.processes import Logged, wait_for

pytestmark = pytest.mark.e2e

NOW = 1_767_225_600_000


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([1, 2], "expected a JSON object"),
        ({"ts_ms": NOW, "values": {"a": 1}}, "series must be a string"),
        ({"series": "s", "ts_ms": "now", "values": {"a": 1}}, "ts_ms must be an integer"),
        ({"series": "s", "ts_ms": -5, "values": {"a": 1}}, "before the epoch"),
        ({"series": "s", "ts_ms": NOW + 2 * 86_400_000, "values": {"a": 1}}, "in the future"),
        ({"series": "s", "ts_ms": NOW, "values": {}}, "values must be an object of 1 to"),
        ({"series": "s", "ts_ms": NOW, "values": {"a": "high"}}, "values['a'] must be a finite number"),
        ({"series": "s", "ts_ms": NOW, "values": {"a": True}}, "values['a'] must be a finite number"),
        ({"series": "s", "ts_ms": NOW, "values": {"a": 1}, "label": 7}, "label must be 0 or 1"),
    ],
)
def test_a_bad_event_is_refused_with_its_reason(doc: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        parse_metric(doc, NOW, 86_400_000)


def test_the_shuttle_stream_scores_well_through_the_dataflow(brokers: str, tmp_path: Path) -> None:
    events = list(shuttle(8_000))
    events.insert(100, {"series": "shuttle", "ts_ms": "soon", "values": {}})  # a dead letter, not a stop
    result = evaluate(events, "shuttle-test", brokers, tmp_path)
    assert result["scored"] == 8_000 and result["dead_letters"] == 1
    assert result["roc_auc"] is not None and result["roc_auc"] > 0.85


def scores(brokers: str, topic: str) -> dict[tuple[str, int], float]:
    return {
        (d["series"], d["ts_ms"]): d["score"]
        for d in (orjson.loads(m.value or b"") for m in read_topic(brokers, topic))
    }


def test_scores_after_a_kill_9_equal_those_of_a_run_without_it(brokers: str, topic: str, tmp_path: Path) -> None:
    events = [{**e, "series": f"s{i % 3}"} for i, e in enumerate(shuttle(None))]
    source = f"{topic}.metrics"
    ensure_topics(brokers, Settings(input_topic=source).topics()[:2])
    produce(brokers, (KafkaMessage(orjson.dumps(e), key=str(e["series"]).encode(), topic=source) for e in events))

    def start(run: str) -> Logged:
        s = Settings(input_topic=source, scores_topic=f"{topic}.{run}", anomalies_topic=f"{topic}.{run}-anomalies")
        ensure_topics(brokers, s.topics())
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": brokers,
            "TELEMETRY_INPUT_TOPIC": source,
            "TELEMETRY_SCORES_TOPIC": s.scores_topic,
            "TELEMETRY_ANOMALIES_TOPIC": s.anomalies_topic,
            "TELEMETRY_BOUNDED": "true",
            "TELEMETRY_METRICS_PORT": "0",
        }
        cmd = run_command("dataflows.telemetry_anomalies:build()", tmp_path / run / "recovery", snapshot_s=1)
        return Logged(cmd, env, tmp_path / f"{run}.log")

    clean = start("clean")
    assert clean.wait(timeout=300) == 0, clean.output()
    crashed = start("crashed")
    wait_for(lambda: crashed.poll() is not None or len(read_topic(brokers, f"{topic}.crashed")) > 25_000, "scores", 120)
    assert crashed.poll() is None, "the run ended before the kill; give it more events"
    # past its first snapshots (every second): the kill must resume from one, not from the start
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    resumed = start("crashed")
    assert resumed.wait(timeout=300) == 0, resumed.output()

    expected, got = scores(brokers, f"{topic}.clean"), scores(brokers, f"{topic}.crashed")
    assert len(expected) == len(events) and got == expected  # replayed events were scored again, identically
    labels = np.array([e["label"] for e in events])
    assert roc_auc(labels, np.array([expected[(str(e["series"]), int(str(e["ts_ms"])))] for e in events])) > 0.8
