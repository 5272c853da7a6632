"""Fraud detection through the running dataflow: a decision per payment, labels, bad input, kill -9."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from dataflows.fraud_detection import Settings
from dataflows.launch import run_command
from operators.kafka import KafkaMessage, ensure_topics, produce, read_topic
from operators.settings import from_env
from scripts.fraud_traffic import Traffic, generate, table_messages
from tests.support.processes import Logged, wait_for

pytestmark = pytest.mark.e2e

VELOCITY = ("count_1m", "count_1h", "count_24h", "log_sum_1h", "amount_z", "log_history", "log_since_previous_s")


class Fraud:
    """The dataflow on this test's own topics, fed with generated traffic."""

    def __init__(self, brokers: str, topic: str, tmp: Path) -> None:
        self.brokers, self.tmp = brokers, tmp
        names = ("payments", "chargebacks", "merchants", "decisions", "outcomes", "late")
        self.topics = {name: f"{topic}.{name}" for name in names}
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

    def start(self, run: str, decisions: str | None = None) -> Logged:
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
        }
        cmd = run_command("dataflows.fraud_detection:build()", self.tmp / run / "recovery", snapshot_s=1)
        return Logged(cmd, env, self.tmp / f"{run}.log")

    def decisions(self, topic: str | None = None) -> dict[str, dict[str, Any]]:
        return {
            d["payment_id"]: d
            for d in (orjson.loads(m.value or b"") for m in read_topic(self.brokers, topic or self.topics["decisions"]))
        }


@pytest.fixture
def fraud(brokers: str, topic: str, tmp_path: Path) -> Fraud:
    return Fraud(brokers, topic, tmp_path)


def test_every_payment_gets_a_decision_and_every_bad_input_a_reason(fraud: Fraud) -> None:
    t = fraud.topics["payments"]
    bad = [
        KafkaMessage(b"{not json", topic=t),
        KafkaMessage(orjson.dumps({"payment_id": "x1", "card": "c", "amount": 5}), topic=t),
        KafkaMessage(
            orjson.dumps(
                {
                    **dict.fromkeys(("payment_id", "card", "card_country", "merchant", "country"), "a"),
                    "amount": "5",
                    "card_present": True,
                    "ts_ms": 1,
                }
            ),
            topic=t,
        ),
        KafkaMessage(
            orjson.dumps(
                {
                    **dict.fromkeys(("payment_id", "card", "card_country", "merchant", "country"), "a"),
                    "amount": 5,
                    "card_present": True,
                    "ts_ms": -1,
                }
            ),
            topic=t,
        ),
        KafkaMessage(
            orjson.dumps(
                {
                    **dict.fromkeys(("payment_id", "card", "card_country", "merchant", "country"), "a"),
                    "amount": 5,
                    "card_present": True,
                    "ts_ms": 10**15,
                }
            ),
            topic=t,
        ),
    ]
    traffic = fraud.feed(6_000, tuple(bad))
    run = fraud.start("once")
    assert run.wait(timeout=300) == 0, run.output()
    decisions = fraud.decisions()
    assert set(decisions) == {p["payment_id"] for p in traffic.payments}
    sample = decisions[traffic.payments[-1]["payment_id"]]
    assert sample["decision"] in ("block", "allow") and 0 <= sample["score"] <= 1 and 0 <= sample["torch_score"] <= 1
    assert set(sample["complete"]) == {"merchant", "card_history"} and sample["latency_ms"] >= 0
    outcomes = [orjson.loads(m.value or b"") for m in read_topic(fraud.brokers, fraud.topics["outcomes"])]
    assert {o["payment_id"] for o in outcomes} == set(decisions)
    assert sum(o["label"] for o in outcomes) == len(traffic.chargebacks)
    reasons = [dict(m.headers)["dlq.reason"] or b"" for m in read_topic(fraud.brokers, f"{t}.dlq")]
    assert len(reasons) == 5 and all(reasons), reasons
    assert (
        any(b"amount must be a number" in r for r in reasons)
        and sum(b"ts_ms must be epoch ms" in r for r in reasons) == 2
    )


def test_velocity_features_after_a_kill_9_equal_those_of_a_run_without_it(fraud: Fraud) -> None:
    fraud.feed(30_000)
    clean = fraud.start("clean", decisions=f"{fraud.topics['decisions']}-clean")
    assert clean.wait(timeout=300) == 0, clean.output()
    crashed = fraud.start("crashed")
    decisions = fraud.topics["decisions"]
    wait_for(lambda: crashed.poll() is not None or len(read_topic(fraud.brokers, decisions)) > 15_000, "decisions", 120)
    assert crashed.poll() is None, "the run ended before the kill; give it more payments"
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    resumed = fraud.start("crashed")
    assert resumed.wait(timeout=300) == 0, resumed.output()
    expected, got = fraud.decisions(f"{decisions}-clean"), fraud.decisions()
    assert got.keys() == expected.keys() and len(got) == 30_000
    for pid, want in expected.items():
        assert {k: got[pid]["features"][k] for k in VELOCITY} == {k: want["features"][k] for k in VELOCITY}, pid
