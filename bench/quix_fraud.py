"""The fraud pipeline of ``dataflows.fraud_detection`` written with Quix Streams: the baseline of
``bench.streaming``. It runs in its own environment (Quix Streams pins an older confluent-kafka),
which ``bench.streaming`` makes; it is not part of the platform.

The same steps and the same code for every computation (parsing, the velocity features of
``dataflows.fraud_detection.features.observe``, the decision's features, the river model, the torch model's
inputs, the decision), written the way Quix Streams' documentation shows:

- payments (keyed by card) → ``apply(stateful=True)``: the card's history in Quix's RocksDB state;
- ``group_by`` merchant (a repartition topic) → ``join_asof`` with the merchants topic (left join:
  the merchant's latest row at or before the payment);
- the river model (one per model shard, in process memory, as Quix's ML examples hold models)
  and the torch model, one forward pass per payment (Quix hands an ``apply`` one message);
- decisions → ``to_topic``;
- learning: decisions ``group_by`` payment id, ``concat`` with chargebacks, a tumbling window
  of the label window per payment id (``reduce`` then ``final``), then ``learn_one``.

One setting differs from Quix's defaults: ``consumer_poll_timeout`` of 20 ms rather than 1 s
(see below). Differences, both in Quix's favour: the river models are not in fault-tolerant state (a
crash loses what they learned), and there is no second label join for the outcomes topic
(the prequential metrics). Tumbling windows are aligned to the epoch, so a payment's label
window ends at the next window boundary rather than a fixed time after the payment.

    <quix environment>/bin/python -m bench.quix_fraud   # settings: QUIX_* variables, see Settings
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from quixstreams import Application

from dataflows.fraud_detection import Settings as FraudSettings
from dataflows.fraud_detection.features import Features, new_history, observe
from dataflows.fraud_detection.items import Payment, merchant_row, parse_payment
from dataflows.fraud_detection.scoring import (
    DAY_MS,
    FRAUD_MODEL,
    LOOKBACKS_MS,
    case_of,
    decide,
    model_shard,
    tabular_inputs,
)
from models.registry import get_spec
from operators.joins import Enriched
from operators.kafka import KafkaMessage
from operators.kafka.security import security_config
from patternflow import wall_ms


@dataclass(frozen=True)
class Settings:
    brokers: str = os.environ.get("QUIX_BROKERS", "127.0.0.1:9092")
    group: str = os.environ.get("QUIX_GROUP", "quix-fraud")
    state_dir: str = os.environ.get("QUIX_STATE_DIR", "var/state/quix-fraud")
    payments_topic: str = os.environ.get("QUIX_PAYMENTS_TOPIC", "payments")
    chargebacks_topic: str = os.environ.get("QUIX_CHARGEBACKS_TOPIC", "chargebacks")
    merchants_topic: str = os.environ.get("QUIX_MERCHANTS_TOPIC", "merchants")
    decisions_topic: str = os.environ.get("QUIX_DECISIONS_TOPIC", "payments.decisions")
    label_window_ms: int = int(os.environ.get("QUIX_LABEL_WINDOW_MS", str(7 * DAY_MS)))
    allowed_lateness_ms: int = int(os.environ.get("QUIX_ALLOWED_LATENESS_MS", "60000"))
    model_shards: int = int(os.environ.get("QUIX_MODEL_SHARDS", "2"))
    threshold: float = float(os.environ.get("QUIX_THRESHOLD", "0.5"))


def _security() -> dict[str, Any]:
    """The client-security profile's librdkafka settings, without the error callback Quix sets itself."""
    config = security_config()
    del config["error_cb"]
    return config


def main() -> None:
    s = Settings()
    fraud_settings = FraudSettings(kafka_bootstrap_servers=s.brokers, threshold=s.threshold)
    torch.set_num_threads(1)  # as the dataflow's default (FRAUD_TORCH_THREADS)
    scorer = get_spec("tabular-risk").load()
    models: dict[str, Any] = {}

    def model(card: str) -> Any:
        shard = model_shard(card, s.model_shards)
        if shard not in models:
            models[shard] = FRAUD_MODEL.make()
        return models[shard]

    app = Application(
        broker_address=s.brokers,
        consumer_group=s.group,
        auto_offset_reset="earliest",
        state_dir=s.state_dir,
        loglevel="WARNING",
        # Tuned for latency: with its default of 1 s, each poll waits up to a second to fill a
        # batch, and at 200 messages/s decisions took 3 s (p50); at 20 ms they take tens of ms.
        consumer_poll_timeout=0.02,
        # The client-security profile, as for every other client (error_cb: Quix sets its own).
        consumer_extra_config=_security(),
        producer_extra_config=_security(),
    )
    payments = app.dataframe(app.topic(s.payments_topic, value_deserializer="bytes", key_deserializer="str"))

    # Values are dicts: Quix writes them to its repartition topics as JSON.
    def parse(value: bytes, key: str, timestamp: int, headers: Any) -> dict[str, Any]:
        msg = KafkaMessage(value, key=key.encode(), timestamp_ms=timestamp)
        return asdict(parse_payment(msg, wall_ms(), fraud_settings.max_future_ms))

    payments = payments.apply(parse, metadata=True)
    payments = payments.set_timestamp(lambda value, key, timestamp, headers: value["ts_ms"])

    def velocity(p: dict[str, Any], state: Any) -> dict[str, Any]:
        doc = state.get("history") or new_history(p["ts_ms"])
        f = observe(doc, p["ts_ms"], p["amount"], None, LOOKBACKS_MS)
        state.set("history", doc)
        return {
            "payment": p,
            "features": {**f.__dict__, "counts": list(f.counts.items()), "sums": list(f.sums.items())},
        }

    with_velocity = payments.apply(velocity, stateful=True)
    by_merchant = with_velocity.group_by(
        lambda v: v["payment"]["merchant"], name="by_merchant", key_serializer="str", key_deserializer="str"
    )
    merchants = app.dataframe(app.topic(s.merchants_topic, value_deserializer="json", key_deserializer="str"))
    merchants = merchants.set_timestamp(lambda value, key, timestamp, headers: value["ts_ms"])
    enriched = by_merchant.join_asof(
        merchants,
        how="left",
        on_merge=lambda left, right: {**left, "merchant_row": right},
        grace_ms=30 * DAY_MS,
    )

    def score_and_decide(v: dict[str, Any]) -> dict[str, Any]:
        f = v["features"]
        features = Features(**{**f, "counts": dict(f["counts"]), "sums": dict(f["sums"])})
        row = v.get("merchant_row")
        case = case_of(Enriched((Payment(**v["payment"]), features), merchant_row(row) if row else None))
        river_score = FRAUD_MODEL.score(model(case.card), case.x)
        torch_score = float(scorer.forward(np.asarray([tabular_inputs(case)], dtype=np.float32))["risk"][0])
        return asdict(decide(case, river_score, torch_score, fraud_settings.threshold))

    decisions = enriched.apply(score_and_decide)
    decisions.to_topic(
        app.topic(s.decisions_topic, value_serializer="json", key_serializer="str"), key=lambda d: d["payment_id"]
    )

    # Learning: each payment with its chargeback, if one comes within the label window.
    to_learn = decisions.group_by(
        lambda d: d["payment_id"], name="by_payment", key_serializer="str", key_deserializer="str"
    ).apply(lambda d: {"card": d["card"], "x": d["features"]})
    chargebacks = app.dataframe(app.topic(s.chargebacks_topic, value_deserializer="json", key_deserializer="str"))
    chargebacks = chargebacks.set_timestamp(lambda value, key, timestamp, headers: value["ts_ms"])
    labelled = (
        to_learn.concat(chargebacks.apply(lambda c: {"chargeback": True}))
        .tumbling_window(s.label_window_ms, grace_ms=s.allowed_lateness_ms, name="labels")
        .reduce(lambda acc, v: {**acc, **v}, lambda v: dict(v))
        .final()
    )

    def learn(window: dict[str, Any]) -> None:
        v = window["value"]
        if "x" in v:  # a chargeback for a payment never decided has nothing to learn from
            FRAUD_MODEL.learn(model(v["card"]), v["x"], bool(v.get("chargeback")))

    labelled.update(learn)
    app.run()


if __name__ == "__main__":
    main()
