"""dataflows.fraud_detection as a process on generated traffic, and the fixture that starts it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from dataflows.fraud_detection import Settings
from dataflows.launch import run_command
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from operators.settings import from_env
from scripts.fraud_traffic import Traffic, generate, table_messages
from tests.support.processes import Logged

VELOCITY = ("count_1m", "count_1h", "count_24h", "log_sum_1h", "amount_z", "log_history", "log_since_previous_s")
NAMES = ("payments", "chargebacks", "merchants", "decisions", "outcomes", "late")  # Settings' <name>_topic


def under(topic: str) -> dict[str, str]:
    """A test's own topics: ``<topic>.payments``, ``<topic>.decisions``, ..."""
    return {name: f"{topic}.{name}" for name in NAMES}


def topics_of(settings: Settings) -> dict[str, str]:
    """The topics ``settings`` names."""
    return {name: getattr(settings, f"{name}_topic") for name in NAMES}


class Fraud:
    """The dataflow on ``topics`` (each of :data:`NAMES` to a topic; created here if missing), fed with
    generated traffic; ``env`` (a principal's profile, ``FRAUD_*``) wins over what :meth:`start` sets."""

    def __init__(self, brokers: str, topics: Mapping[str, str], tmp: Path, **env: str) -> None:
        self.brokers, self.tmp, self.topics, self.extra = brokers, tmp, dict(topics), env
        ensure_topics(brokers, from_env(Settings, "FRAUD_", self.env()).topics())

    def env(self) -> dict[str, str]:
        return {f"FRAUD_{name.upper()}_TOPIC": t for name, t in self.topics.items()}

    def feed(self, n: int, extra: tuple[KafkaMessage, ...] = ()) -> Traffic:
        traffic = generate(n, seed=3)
        t = self.topics
        produce(self.brokers, table_messages(traffic, t["merchants"]))
        pays = [KafkaMessage(orjson.dumps(p), key=p["card"].encode(), topic=t["payments"]) for p in traffic.payments]
        produce(self.brokers, [*pays, *extra])
        cbs = [
            KafkaMessage(orjson.dumps(c), key=c["payment_id"].encode(), topic=t["chargebacks"])
            for c in traffic.chargebacks
        ]
        produce(self.brokers, cbs)
        return traffic

    def start(self, run: str, decisions: str | None = None, *, processes: int = 1) -> Logged:
        """A bounded run, its recovery and state under ``<tmp>/<run>``; with ``processes``, a cluster (the launcher)."""
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": self.brokers,
            **self.env(),
            "FRAUD_DECISIONS_TOPIC": decisions or self.topics["decisions"],
            "FRAUD_BOUNDED": "true",
            "FRAUD_LABEL_WINDOW_MS": "900000",
            "FRAUD_ALLOWED_LATENESS_MS": "21600000",  # a replay at full speed
            "FRAUD_STATE_DIR": str(self.tmp / run / "state"),
            "FRAUD_METRICS_PORT": "0",
            **self.extra,
        }
        cmd = run_command("dataflows.fraud_detection:build()", self.tmp / run / "recovery", snapshot_s=1)
        if processes > 1:
            cmd = [
                sys.executable,
                "-m",
                "dataflows.launch",
                "fraud_detection",
                "--recovery",
                str(self.tmp / run / "recovery"),
            ]
            cmd += ["--snapshot-s", "1", "--processes", str(processes)]
        return Logged(cmd, env, self.tmp / f"{run}.log")

    def decisions(self, topic: str | None = None) -> dict[str, dict[str, Any]]:
        return {
            d["payment_id"]: d
            for d in (orjson.loads(m.value or b"") for m in read_topic(self.brokers, topic or self.topics["decisions"]))
        }


@pytest.fixture
def fraud(brokers: str, topic: str, tmp_path: Path) -> Fraud:
    return Fraud(brokers, under(topic), tmp_path)
