"""The fraud model's quality: under drift, and where to set its threshold.

:func:`online_vs_frozen` takes the decisions (with their features) and outcomes
(with their labels) of a run, trains a fresh copy of the dataflow's model on
the payments before ``drift_ms`` with their labels, freezes it, and scores the
payments after: the ROC-AUC and PR-AUC of those scores against the online
model's scores at decision time, on the same payments.

:func:`threshold_for_precision` reads the outcomes (decision scores with their
labels) for the lowest threshold whose blocked payments are fraud at least a
given share of the time: the operating point to set ``FRAUD_THRESHOLD`` to.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataflows.fraud_detection.scoring import FRAUD_MODEL
from models.quality import pr_auc, roc_auc

__all__ = ["online_vs_frozen", "threshold_for_precision"]


def online_vs_frozen(
    decisions: list[dict[str, Any]], outcomes: list[dict[str, Any]], drift_ms: int
) -> dict[str, float]:
    labels = {o["payment_id"]: o["label"] for o in outcomes}
    labelled = sorted((d for d in decisions if d["payment_id"] in labels), key=lambda d: d["ts_ms"])
    frozen = FRAUD_MODEL.make()
    for d in labelled:
        if d["ts_ms"] < drift_ms:
            FRAUD_MODEL.learn(frozen, d["features"], bool(labels[d["payment_id"]]))
    after = [d for d in labelled if d["ts_ms"] >= drift_ms]
    y = np.array([labels[d["payment_id"]] for d in after])
    online = np.array([d["score"] for d in after])
    fixed = np.array([FRAUD_MODEL.score(frozen, d["features"]) for d in after])
    return {
        "payments_after_drift": len(after),
        "frauds_after_drift": int(y.sum()),
        "online_roc_auc": round(roc_auc(y, online), 3),
        "frozen_roc_auc": round(roc_auc(y, fixed), 3),
        "online_pr_auc": round(pr_auc(y, online), 3),
        "frozen_pr_auc": round(pr_auc(y, fixed), 3),
    }


def threshold_for_precision(outcomes: list[dict[str, Any]], precision: float) -> dict[str, float] | None:
    """The lowest score threshold at which the payments scored at or above it are fraud at least
    ``precision`` of the time, with the recall and the share of payments it blocks there; ``None``
    if no threshold reaches that precision."""
    scores = np.array([o["score"] for o in outcomes], dtype=np.float64)
    labels = np.array([o["label"] for o in outcomes], dtype=np.int64)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    # Blocking at threshold scores[i] blocks every payment scored at least that: the last of a tie.
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    caught = np.cumsum(labels)[last_of_tie]
    blocked = (np.arange(1, len(scores) + 1))[last_of_tie]
    meets = np.nonzero(caught / blocked >= precision)[0]
    if not len(meets) or not labels.sum():
        return None
    at = meets[-1]
    return {
        "threshold": float(scores[last_of_tie][at]),
        "precision": round(float(caught[at] / blocked[at]), 3),
        "recall": round(float(caught[at] / labels.sum()), 3),
        "blocked_share": round(float(blocked[at] / len(scores)), 4),
    }
