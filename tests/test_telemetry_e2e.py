"""Telemetry anomaly detection through the running dataflow: quality, bad events, kill -9."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from dataflows.telemetry_anomalies import Settings, parse_metric
from models.quality import roc_auc
from operators.kafka import read_topic
from scripts.evaluate_anomalies import evaluate, shuttle
from tests.support.processes import wait_for
from tests.support.telemetry import Telemetry

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


def test_scores_after_a_kill_9_equal_those_of_a_run_without_it(brokers: str, topic: str, tmp_path: Path) -> None:
    events = [{**e, "series": f"s{i % 3}"} for i, e in enumerate(shuttle(None))]

    def telemetry(run: str) -> Telemetry:  # each run reads the same input, scores to its own topics
        s = Settings(input_topic=f"{topic}.metrics", scores_topic=f"{topic}.{run}", anomalies_topic=f"{topic}.{run}-a")
        return Telemetry(brokers, s, tmp_path / run)

    clean, crashed = telemetry("clean"), telemetry("crashed")
    clean.feed(events)
    run = clean.start()
    assert run.wait(timeout=300) == 0, run.output()
    killed = crashed.start()
    scored = crashed.s.scores_topic
    wait_for(lambda: killed.poll() is not None or len(read_topic(brokers, scored)) > 25_000, "scores", 120)
    assert killed.poll() is None, "the run ended before the kill; give it more events"
    # past its first snapshots (every second): the kill must resume from one, not from the start
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = crashed.start()
    assert resumed.wait(timeout=300) == 0, resumed.output()

    expected, got = clean.scores(), crashed.scores()
    assert len(expected) == len(events) and got == expected  # replayed events were scored again, identically
    labels = np.array([e["label"] for e in events])
    assert roc_auc(labels, np.array([expected[(str(e["series"]), int(str(e["ts_ms"])))] for e in events])) > 0.8
