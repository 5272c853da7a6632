"""Real-time fraud detection: merchant enrichment, per-card velocity, an online model that
learns from chargebacks, a torch model per micro-batch, a decision per payment.

Inputs (``FRAUD_*_TOPIC``):

- ``payments``, keyed by card: ``{"payment_id", "card", "card_country", "merchant", "amount",
  "country", "card_present", "ts_ms"}``;
- ``chargebacks`` (labels, hours or days later): ``{"payment_id", "ts_ms"}``;
- ``merchants``, compacted, keyed by merchant: ``{"merchant", "category", "risk"}`` (a null value deletes).

Per payment, in order: the merchant's current row (``join_table``: an update
changes later decisions, never earlier ones); the card's velocity and spend
features over event-time lookbacks of 1 min, 1 h and 24 h (``lookback_features``,
RocksDB, idle cards expire); a score from a river logistic regression that
learns each payment's label once it is known (``online_model``: a chargeback
within ``FRAUD_LABEL_WINDOW_MS`` of event time makes it fraud, none makes it
legitimate; ``join_within`` keeps the waiting payments in RocksDB and lets them
go when the window passes); and the torch ``tabular-risk`` model, scored once
per micro-batch. The decision goes to ``payments.decisions`` at once, with what
had arrived: ``complete`` says which features were::

    {"payment_id", "card", "ts_ms", "score", "river_score", "torch_score", "decision": "block" | "allow",
     "complete": {"merchant": true, "card_history": false}, "features": {...}, "latency_ms": 12}

Each decision, once its label is known, goes to ``payments.outcomes``
(``{"payment_id", "score", "label"}``) and updates the prequential ROC-AUC and
PR-AUC over the last 10,000 outcomes (``patternflow_model_roc_auc{step="fraud"}``,
``patternflow_model_pr_auc{step="fraud"}``). Payments behind the watermark go
to ``payments.late``; malformed inputs to ``<topic>.dlq`` with the reason. Run::

    python -m bytewax.run "dataflows.fraud_detection:build()" -r var/recovery/fraud -s 2 -b 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
import orjson
from bytewax.dataflow import Dataflow
from river import compose, linear_model, optim, preprocessing

from dataflows.fraud_detection.features import Features, lookback_features
from models.quality import Prequential
from models.registry import get_spec
from operators import metrics
from operators.dlq import DLQ_SUFFIX, decode_json, to_dlq_message, try_map
from operators.joins import Enriched, Joined, join_table, join_within
from operators.kafka import KafkaMessage, Position, TopicSpec
from operators.kafka.sink import kafka_output
from operators.learning import Learn, ModelSpec, Score, Scored, online_model
from operators.settings import from_env
from operators.setup import Application, TorchSettings
from operators.stateful import StateConfig
from operators.windowing import EventClock
from patternflow import InvalidMessage, hash_key, wall_ms

__all__ = [
    "FRAUD_MODEL",
    "LOOKBACKS_MS",
    "Settings",
    "build",
    "decision",
    "features",
    "model_shard",
    "parse_chargeback",
    "parse_merchant",
    "parse_payment",
    "tabular_inputs",
]

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
_decode = decode_json()
LOOKBACKS_MS = (MINUTE_MS, HOUR_MS, DAY_MS)


@dataclass(frozen=True)
class Settings(TorchSettings):
    payments_topic: str = "payments"
    chargebacks_topic: str = "chargebacks"
    merchants_topic: str = "merchants"
    decisions_topic: str = "payments.decisions"
    outcomes_topic: str = "payments.outcomes"
    late_topic: str = "payments.late"
    partitions: int = 3
    threshold: float = 0.5
    label_window_ms: int = 7 * DAY_MS
    # How far event time may run backwards: in a replay at full speed a poll spans hours of event
    # time, and keyed steps emit a poll's items grouped by shard, so replays need hours here.
    allowed_lateness_ms: int = 60_000
    card_ttl_s: int = 30 * 24 * 3600
    model_shards: int = 2
    bounded: bool = False
    state_dir: Path = Path("var/state/fraud")
    state_shards: int = 8
    max_future_ms: int = DAY_MS
    metrics_port: int = 9105

    def topics(self) -> list[TopicSpec]:
        inputs = [self.payments_topic, self.chargebacks_topic]
        return [
            *(TopicSpec(t, partitions=self.partitions) for t in inputs),
            TopicSpec(self.merchants_topic, partitions=self.partitions, cleanup_policy="compact"),
            *(TopicSpec(t + DLQ_SUFFIX, retention_ms=-1) for t in [*inputs, self.merchants_topic]),
            *(TopicSpec(t, partitions=self.partitions) for t in (self.decisions_topic, self.outcomes_topic)),
            TopicSpec(self.late_topic, retention_ms=-1),
        ]


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise InvalidMessage(f"{name} must be a string of 1 to 64 characters, got {value!r:.80}")
    return value


def _time(doc: dict[str, Any], now_ms: int, max_future_ms: int) -> int:
    ts = doc.get("ts_ms")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= now_ms + max_future_ms:
        raise InvalidMessage(
            f"ts_ms must be epoch ms, not before 1970 or more than {max_future_ms} ms ahead: {ts!r:.80}"
        )
    return ts


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def parse_payment(msg: KafkaMessage, now_ms: int, max_future_ms: int) -> dict[str, Any]:
    doc = _object(_decode(msg))
    amount = doc.get("amount")
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount < 1e9:
        raise InvalidMessage(f"amount must be a number above 0, got {amount!r:.80}")
    if not isinstance(doc.get("card_present"), bool):
        raise InvalidMessage(f"card_present must be true or false, got {doc.get('card_present')!r:.80}")
    return {
        "payment_id": _text(doc, "payment_id"),
        "card": _text(doc, "card"),
        "card_country": _text(doc, "card_country"),
        "merchant": _text(doc, "merchant"),
        "country": _text(doc, "country"),
        "amount": float(amount),
        "card_present": doc["card_present"],
        "ts_ms": _time(doc, now_ms, max_future_ms),
        "produced_ms": msg.timestamp_ms or now_ms,
        "partition": msg.partition or 0,  # the watermark keeps a clock per input partition
    }


def parse_chargeback(msg: KafkaMessage, now_ms: int, max_future_ms: int) -> dict[str, Any]:
    doc = _object(_decode(msg))
    return {"payment_id": _text(doc, "payment_id"), "ts_ms": _time(doc, now_ms, max_future_ms)}


def parse_merchant(msg: KafkaMessage) -> tuple[str, dict[str, Any] | None]:
    """``(merchant, row)``; a tombstone (null value) deletes the merchant."""
    if msg.value is None:
        if not msg.key:
            raise InvalidMessage("a merchant tombstone must be keyed by the merchant")
        return msg.key.decode(errors="replace"), None
    doc = _object(_decode(msg))
    risk = doc.get("risk")
    if not isinstance(risk, int | float) or isinstance(risk, bool) or not 0 <= risk <= 1:
        raise InvalidMessage(f"risk must be a number from 0 to 1, got {risk!r:.80}")
    return _text(doc, "merchant"), {"category": str(doc.get("category", "")), "risk": float(risk)}


def features(enriched: Enriched[tuple[dict[str, Any], Features], dict[str, Any]]) -> dict[str, Any]:
    """The decision's context: the model's features and which of them were complete."""
    (p, f), merchant = enriched.value, enriched.row
    std = f.std if f.n > 1 and f.std > 0 else 1.0
    x = {
        "log_amount": math.log1p(p["amount"]),
        "amount_z": (p["amount"] - f.mean) / std if f.n > 1 else 0.0,
        "count_1m": float(f.counts[MINUTE_MS]),
        "count_1h": float(f.counts[HOUR_MS]),
        "log_sum_1h": math.log1p(f.sums[HOUR_MS]),
        "count_24h": float(f.counts[DAY_MS]),
        "log_since_previous_s": math.log1p((f.since_previous_ms or DAY_MS) / 1000),
        "log_history": math.log1p(f.n),
        "merchant_risk": merchant["risk"] if merchant else 0.5,
        "foreign": float(p["country"] != p["card_country"]),
        "card_present": float(p["card_present"]),
    }
    complete = {"merchant": merchant is not None, "card_history": f.complete}
    return {**{k: p[k] for k in ("payment_id", "card", "ts_ms", "produced_ms")}, "x": x, "complete": complete}


def _fraud_model() -> Any:
    return compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression(optimizer=optim.SGD(0.05)))


FRAUD_MODEL = ModelSpec(
    make=_fraud_model,
    score=lambda model, x: model.predict_proba_one(x).get(True, 0.0),
    learn=lambda model, x, label: model.learn_one(x, label),
)


def model_shard(card: str, shards: int) -> str:
    """The river model a card's payments are scored and learned by."""
    return f"model-{hash_key(card) % shards}"


def tabular_inputs(d: dict[str, Any]) -> list[float]:
    """The torch tabular model's eight inputs (amount, hour, merchant risk, distance, velocity,
    account age, foreign, card present) from a decision's features, roughly standardised."""
    x, hour = d["x"], (d["ts_ms"] // HOUR_MS) % 24
    return [
        x["amount_z"],
        hour / 12 - 1,
        x["merchant_risk"] * 4 - 2,
        x["foreign"] * 2,
        x["count_1h"] - 1,
        x["log_history"] - 2,
        x["foreign"],
        x["card_present"],
    ]


def _torch_batch(model: Any, scored: list[tuple[str, Scored[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The torch model over the whole micro-batch in one forward pass."""
    rows = [tabular_inputs(s.item) for _, s in scored]
    risk = model.forward(np.asarray(rows, dtype=np.float32))["risk"].tolist() if rows else []
    return [{**s.item, "river_score": s.score, "torch_score": r} for (_, s), r in zip(scored, risk, strict=True)]


def decision(s: Settings, d: dict[str, Any]) -> dict[str, Any]:
    score = d["river_score"]
    return {
        "payment_id": d["payment_id"],
        "card": d["card"],
        "ts_ms": d["ts_ms"],
        "score": score,
        "river_score": score,
        "torch_score": d["torch_score"],
        "decision": "block" if score >= s.threshold else "allow",
        "complete": d["complete"],
        "features": d["x"],
        "latency_ms": wall_ms() - d["produced_ms"],
    }


class _Quality:
    """Prequential ROC-AUC and PR-AUC of the decisions whose labels are known (monitoring: per process)."""

    def __init__(self) -> None:
        self._quality = Prequential()

    def outcome(self, s: Settings, joined: Joined[dict[str, Any], dict[str, Any]]) -> list[KafkaMessage]:
        decision = joined.left
        if decision is None:  # a chargeback for a payment this run never decided
            return []
        label = int(joined.right is not None)
        if self._quality.add(bool(label), decision["score"]):
            metrics.model_quality("fraud", "all", self._quality)
        doc = {"payment_id": decision["payment_id"], "score": decision["score"], "label": label}
        return [KafkaMessage(orjson.dumps(doc), key=decision["payment_id"].encode(), topic=s.outcomes_topic)]


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="FRAUD_")
    app = Application.start(s, s.topics())
    scorer = get_spec("tabular-risk").load()
    state = StateConfig(s.state_dir, shards=s.state_shards)
    flow = Dataflow("fraud_detection")

    def source(topic: str, start: Position = s.start) -> Any:
        return app.source([topic], start=start, bounded=s.bounded)

    payments = try_map(
        "parse_payment",
        op.input("payments", flow, source(s.payments_topic)),
        lambda m: parse_payment(m, wall_ms(), s.max_future_ms),
    )
    chargebacks = try_map(
        "parse_chargeback",
        op.input("chargebacks", flow, source(s.chargebacks_topic)),
        lambda m: parse_chargeback(m, wall_ms(), s.max_future_ms),
    )
    # The merchant table is read whole, whatever the start: it is the current state of every merchant.
    merchants = try_map(
        "parse_merchant", op.input("merchants", flow, source(s.merchants_topic, Position.earliest())), parse_merchant
    )
    # Velocity first, straight from the source: keyed steps emit a batch grouped by shard, so
    # after any other keyed step a partition's payments would no longer be in event-time order.
    # A clock per payments partition: one read ahead of another makes nothing late.
    clock: EventClock[dict[str, Any]] = EventClock(
        lambda p: p["ts_ms"],
        allowed_lateness_ms=s.allowed_lateness_ms,
        stream_of=lambda p: str(p["partition"]),
        streams=app.partition_count(s.payments_topic),
    )
    velocity = lookback_features(
        "velocity",
        op.key_on("by_card", payments.oks, lambda p: p["card"]),
        clock,
        value_of=lambda p: p["amount"],
        lookbacks_ms=LOOKBACKS_MS,
        state=state,
        ttl_ms=s.card_ttl_s * 1000,
    )
    # (payment, Features); payments behind the watermark on velocity.late
    enriched = join_table(
        "merchant", op.key_on("by_merchant", velocity.down, lambda pf: pf[0]["merchant"]), merchants.oks, state
    )
    # (merchant, Enriched((payment, Features), merchant row | None))
    decided = op.map("features", op.key_rm("unkey_merchant", enriched), features)
    # dict: payment_id, card, ts_ms, produced_ms, x (features), complete

    labels_by_id = op.key_on("cb_by_id", chargebacks.oks, lambda c: c["payment_id"])

    def with_label(step_id: str, payments: Any, *, hold_pairs: bool = False) -> Any:
        """Each payment (a dict with payment_id and ts_ms) with its chargeback, if one comes within the window."""
        return join_within(
            step_id,
            op.key_on(f"{step_id}_by_id", payments, lambda d: d["payment_id"]),
            labels_by_id,
            left_ms=lambda d: d["ts_ms"],
            right_ms=lambda c: c["ts_ms"],
            within_ms=s.label_window_ms,
            state=state,
            allowed_lateness_ms=s.allowed_lateness_ms,
            hold_pairs=hold_pairs,
        )

    scores = op.map("to_score", decided, lambda d: (model_shard(d["card"], s.model_shards), Score(d["x"], d)))
    # Every payment is learned when its label window closes, fraud or not: learning chargebacks
    # at once and legitimate payments a window later would skew the model to fraud.
    labelled = with_label("label", decided, hold_pairs=True)
    # (payment_id, Joined(decision context | None, chargeback | None)), at the end of the label window
    learns = op.flat_map(
        "to_learn",
        op.key_rm("unkey_label", labelled),
        lambda j: (
            []
            if j.left is None
            else [(model_shard(j.left["card"], s.model_shards), Learn(j.left["x"], j.right is not None))]
        ),
    )
    scored = online_model("river", op.merge("commands", scores, learns), FRAUD_MODEL, shards=s.model_shards)
    # (model shard, Scored(decision context, river score))
    with_torch = op.flat_map_batch("torch", scored, lambda batch: _torch_batch(scorer, batch))
    decisions = op.map("decide", with_torch, lambda d: decision(s, d))
    # dict: the decision
    decision_msgs = op.map(
        "decision_msgs",
        decisions,
        lambda d: KafkaMessage(orjson.dumps(d), key=d["payment_id"].encode(), topic=s.decisions_topic),
    )

    quality = _Quality()
    outcomes = with_label("outcome", decisions)
    outcome_msgs = op.flat_map("outcomes", op.key_rm("unkey_outcome", outcomes), lambda j: quality.outcome(s, j))
    late = op.map(
        "late",
        velocity.late,
        lambda item: KafkaMessage(orjson.dumps(item.value), key=item.key.encode(), topic=s.late_topic),
    )
    dead = op.map("dead", op.merge("errs", payments.errs, chargebacks.errs, merchants.errs), to_dlq_message)
    sink = app.sink(dlq_topic=s.payments_topic + DLQ_SUFFIX)
    kafka_output("publish", op.merge("out", decision_msgs, outcome_msgs, late, dead), sink)
    return flow
