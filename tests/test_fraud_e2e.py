"""Fraud detection through the running dataflow: a decision per payment, labels, bad input, kill -9."""

from __future__ import annotations

import signal

import orjson
import pytest

from operators.kafka import KafkaMessage, read_topic
from tests.support.fraud import VELOCITY, Fraud
from tests.support.processes import wait_for

pytestmark = pytest.mark.e2e


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
