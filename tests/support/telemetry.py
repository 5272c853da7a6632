"""dataflows.telemetry_anomalies as a process on a test's own topics, fed with labelled events."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from dataflows.launch import run_command
from dataflows.telemetry_anomalies import Settings
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from scripts.evaluate_anomalies import replay_env
from tests.support.processes import Logged

__all__ = ["Telemetry"]


class Telemetry:
    """The dataflow on the topics of ``settings`` (created here if missing), a bounded replay unless
    ``env`` says otherwise; ``env`` (a principal's profile, ``TELEMETRY_*``) wins over the defaults."""

    def __init__(self, brokers: str, settings: Settings, tmp: Path, **env: str) -> None:
        self.brokers, self.s, self.tmp = brokers, settings, tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**replay_env(brokers, settings), **env}
        ensure_topics(brokers, settings.topics())

    def feed(self, events: Iterable[dict[str, Any]]) -> None:
        """The events to the input topic, keyed by series."""
        msgs = (KafkaMessage(orjson.dumps(e), key=str(e["series"]).encode(), topic=self.s.input_topic) for e in events)
        produce(self.brokers, msgs)

    def start(self) -> Logged:
        """A run, its recovery under ``<tmp>/recovery`` (a run started again resumes from it)."""
        cmd = run_command("dataflows.telemetry_anomalies:build()", self.tmp / "recovery", snapshot_s=1)
        return Logged(cmd, self.env, self.tmp / "telemetry.log")

    def scores(self) -> dict[tuple[str, int], float]:
        """Each scored event's score, by (series, ts_ms)."""
        return {(d["series"], d["ts_ms"]): d["score"] for d in self._read(self.s.scores_topic)}

    def anomalies(self) -> list[dict[str, Any]]:
        return self._read(self.s.anomalies_topic)

    def _read(self, topic: str) -> list[dict[str, Any]]:
        return [orjson.loads(m.value or b"") for m in read_topic(self.brokers, topic)]
