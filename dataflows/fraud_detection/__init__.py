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
to ``payments.late``; malformed inputs to ``<topic>.dlq`` with the reason. The items and their
messages are in :mod:`~dataflows.fraud_detection.items`, the models and the decision in
:mod:`~dataflows.fraud_detection.scoring`, the velocity features in
:mod:`~dataflows.fraud_detection.features`. Run::

    python -m bytewax.run "dataflows.fraud_detection:build()" -r var/recovery/fraud -s 2 -b 0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.operators import KeyedStream

from dataflows.fraud_detection.features import FeaturesOut, lookback_features
from dataflows.fraud_detection.items import (
    Chargeback,
    Payment,
    decision_message,
    late_message,
    outcome_message,
    parse_chargeback,
    parse_merchant,
    parse_payment,
)
from dataflows.fraud_detection.scoring import (
    DAY_MS,
    FRAUD_MODEL,
    LOOKBACKS_MS,
    Quality,
    case_of,
    decide_batch,
    learn_command,
    score_command,
)
from models.registry import get_spec
from operators.dlq import DLQ_SUFFIX, to_dlq_message, try_map
from operators.joins import Joined, join_table, join_within
from operators.kafka import KafkaMessage, Position, TopicSpec
from operators.kafka.sink import kafka_output
from operators.learning import online_model
from operators.settings import from_env
from operators.setup import Application, TorchSettings
from operators.stateful import StateConfig
from operators.windowing import EventClock
from patternflow import wall_ms

__all__ = ["Settings", "build"]


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


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="FRAUD_")
    app = Application.start(s, s.topics())
    scorer = get_spec("tabular-risk").load()
    state = StateConfig(s.state_dir, shards=s.state_shards)
    flow = Dataflow("fraud_detection")

    def read(step_id: str, topic: str, start: Position = s.start) -> Stream[KafkaMessage]:
        return op.input(step_id, flow, app.source([topic], start=start, bounded=s.bounded))

    ahead_ms = s.max_future_ms
    payments = try_map(
        "parse_payment", read("payments", s.payments_topic), lambda m: parse_payment(m, wall_ms(), ahead_ms)
    )
    chargebacks = try_map(
        "parse_chargeback", read("chargebacks", s.chargebacks_topic), lambda m: parse_chargeback(m, wall_ms(), ahead_ms)
    )
    # The merchant table is read whole, whatever the start: it is the current state of every merchant.
    merchants = try_map("parse_merchant", read("merchants", s.merchants_topic, Position.earliest()), parse_merchant)
    # oks: Payment, Chargeback, (merchant, Merchant | None: a deletion); errs: DeadLetter
    # Velocity first, straight from the source: keyed steps emit a batch grouped by shard, so
    # after any other keyed step a partition's payments would no longer be in event-time order.
    velocity = _velocity(op.key_on("by_card", payments.oks, lambda p: p.card), app, s, state)
    # down: (Payment, Features); late: Late[Payment], behind the watermark
    by_merchant = op.key_on("by_merchant", velocity.down, lambda pf: pf[0].merchant)
    enriched = join_table("merchant", by_merchant, merchants.oks, state)
    # (merchant, Enriched((Payment, Features), merchant row | None))
    cases = op.map("features", op.key_rm("unkey_merchant", enriched), case_of)
    # Case: the payment's features and which were complete
    labels = op.key_on("cb_by_id", chargebacks.oks, lambda c: c.payment_id)
    # Every payment is learned when its label window closes, fraud or not: learning chargebacks
    # at once and legitimate payments a window later would skew the model to fraud.
    labelled = _with_label("label", cases, labels, s, state, hold_pairs=True)
    # Joined(Case, Chargeback | None), at the end of each payment's label window
    learns = op.flat_map("to_learn", labelled, learn_command(s.model_shards))
    scores = op.map("to_score", cases, score_command(s.model_shards))
    scored = online_model("river", op.merge("commands", scores, learns), FRAUD_MODEL, shards=s.model_shards)
    # (model shard, Scored[Case]): the river score, before the model learns the case
    decisions = op.flat_map_batch("torch", scored, decide_batch(scorer, s.threshold))
    # Decision: the torch model over each micro-batch in one forward pass
    outcomes = op.flat_map("outcomes", _with_label("outcome", decisions, labels, s, state), Quality().outcome)
    # Outcome: each decision with its label, once known
    out = op.merge(
        "out",
        op.map("decision_msgs", decisions, lambda d: decision_message(s.decisions_topic, d)),
        op.map("outcome_msgs", outcomes, lambda o: outcome_message(s.outcomes_topic, o)),
        op.map("late", velocity.late, lambda late: late_message(s.late_topic, late)),
        op.map("dead", op.merge("errs", payments.errs, chargebacks.errs, merchants.errs), to_dlq_message),
    )
    # KafkaMessage: decisions, outcomes, late payments, dead letters
    kafka_output("publish", out, app.sink(dlq_topic=s.payments_topic + DLQ_SUFFIX))
    return flow


def _velocity(by_card: KeyedStream[Payment], app: Application, s: Settings, state: StateConfig) -> FeaturesOut[Payment]:
    """Each payment with its card's velocity and spend features over :data:`LOOKBACKS_MS`."""
    # Event time with a clock per payments partition: one read ahead of another makes nothing late.
    clock: EventClock[Payment] = EventClock(
        lambda p: p.ts_ms,
        allowed_lateness_ms=s.allowed_lateness_ms,
        stream_of=lambda p: str(p.partition),
        streams=app.partition_count(s.payments_topic),
    )
    return lookback_features(
        "velocity",
        by_card,
        clock,
        value_of=lambda p: p.amount,
        lookbacks_ms=LOOKBACKS_MS,
        state=state,
        ttl_ms=s.card_ttl_s * 1000,
    )


def _with_label(
    step_id: str,
    items: Stream[Any],
    labels: KeyedStream[Chargeback],
    s: Settings,
    state: StateConfig,
    *,
    hold_pairs: bool = False,
) -> Stream[Joined[Any, Chargeback]]:
    """Each item (a case or a decision) with its payment's chargeback, if one comes within the label window."""
    joined = join_within(
        step_id,
        op.key_on(f"{step_id}_by_id", items, lambda item: item.payment_id),
        labels,
        left_ms=lambda item: item.ts_ms,
        right_ms=lambda c: c.ts_ms,
        within_ms=s.label_window_ms,
        state=state,
        allowed_lateness_ms=s.allowed_lateness_ms,
        hold_pairs=hold_pairs,
    )
    return op.key_rm(f"unkey_{step_id}", joined)
