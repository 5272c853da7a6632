"""The fraud models: a payment's case (its features), the river model that learns from
chargebacks, the torch model's inputs, and the decision; the prequential quality of the
decisions whose labels are known."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from river import compose, linear_model, optim, preprocessing

from dataflows.fraud_detection.features import Features
from dataflows.fraud_detection.items import Case, Chargeback, Decision, Merchant, Outcome, Payment, revived
from models.quality import Prequential
from operators import metrics
from operators.joins import Enriched, Joined
from operators.learning import Learn, ModelSpec, Score, Scored
from patternflow import hash_key, wall_ms

__all__ = [
    "FRAUD_MODEL",
    "LOOKBACKS_MS",
    "Quality",
    "case_of",
    "decide",
    "decide_batch",
    "learn_command",
    "model_shard",
    "score_command",
    "tabular_inputs",
]

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
LOOKBACKS_MS = (MINUTE_MS, HOUR_MS, DAY_MS)


def case_of(enriched: Enriched[tuple[Payment, Features], Merchant]) -> Case:
    """The payment's features for the models, and which of them were complete. (The merchant's
    row comes from the join's keyed state, as its document.)"""
    (p, f), merchant = enriched.value, revived(Merchant, enriched.row)
    std = f.std if f.n > 1 and f.std > 0 else 1.0
    x = {
        "log_amount": math.log1p(p.amount),
        "amount_z": (p.amount - f.mean) / std if f.n > 1 else 0.0,
        "count_1m": float(f.counts[MINUTE_MS]),
        "count_1h": float(f.counts[HOUR_MS]),
        "log_sum_1h": math.log1p(f.sums[HOUR_MS]),
        "count_24h": float(f.counts[DAY_MS]),
        "log_since_previous_s": math.log1p((f.since_previous_ms or DAY_MS) / 1000),
        "log_history": math.log1p(f.n),
        "merchant_risk": merchant.risk if merchant else 0.5,
        "foreign": float(p.country != p.card_country),
        "card_present": float(p.card_present),
    }
    complete = {"merchant": merchant is not None, "card_history": f.complete}
    return Case(p.payment_id, p.card, p.ts_ms, p.produced_ms, x, complete)


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


def score_command(shards: int) -> Callable[[Case], tuple[str, Score]]:
    return lambda case: (model_shard(case.card, shards), Score(case.x, case))


def learn_command(shards: int) -> Callable[[Joined[Case, Chargeback]], list[tuple[str, Learn]]]:
    """A payment's case learned with its label (fraud: a chargeback came) at the end of its label window."""

    def learn(joined: Joined[Case, Chargeback]) -> list[tuple[str, Learn]]:
        case = revived(Case, joined.left)
        if case is None:  # a chargeback for a payment this run never decided
            return []
        return [(model_shard(case.card, shards), Learn(case.x, joined.right is not None))]

    return learn


def tabular_inputs(case: Case) -> list[float]:
    """The torch tabular model's eight inputs (amount, hour, merchant risk, distance, velocity,
    account age, foreign, card present) from a case's features, roughly standardised."""
    x, hour = case.x, (case.ts_ms // HOUR_MS) % 24
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


def decide(case: Case, river_score: float, torch_score: float, threshold: float) -> Decision:
    """Block at or above ``threshold`` of the river score; the torch score is reported beside it."""
    return Decision(
        payment_id=case.payment_id,
        card=case.card,
        ts_ms=case.ts_ms,
        score=river_score,
        river_score=river_score,
        torch_score=torch_score,
        decision="block" if river_score >= threshold else "allow",
        complete=case.complete,
        features=case.x,
        latency_ms=wall_ms() - case.produced_ms,
    )


def decide_batch(model: Any, threshold: float) -> Callable[[list[tuple[str, Scored[Case]]]], list[Decision]]:
    """The decisions of a micro-batch of river-scored cases, the torch model run over it in one forward pass."""

    def decide_all(batch: list[tuple[str, Scored[Case]]]) -> list[Decision]:
        rows = [tabular_inputs(scored.item) for _, scored in batch]
        risk = model.forward(np.asarray(rows, dtype=np.float32))["risk"].tolist() if rows else []
        return [decide(s.item, s.score, r, threshold) for (_, s), r in zip(batch, risk, strict=True)]

    return decide_all


class Quality:
    """Prequential ROC-AUC and PR-AUC of the decisions whose labels are known (monitoring: per process)."""

    def __init__(self) -> None:
        self._quality = Prequential()

    def outcome(self, joined: Joined[Decision, Chargeback]) -> list[Outcome]:
        decision = revived(Decision, joined.left)
        if decision is None:  # a chargeback for a payment this run never decided
            return []
        label = int(joined.right is not None)
        if self._quality.add(bool(label), decision.score):
            metrics.model_quality("fraud", "all", self._quality)
        return [Outcome(decision.payment_id, decision.score, label)]
