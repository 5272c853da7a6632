"""The fraud model under drift: the dataflow's online model against the same model trained once and frozen.

:func:`online_vs_frozen` takes the decisions (with their features) and outcomes
(with their labels) of a run, trains a fresh copy of the dataflow's model on
the payments before ``drift_ms`` with their labels, freezes it, and scores the
payments after: the ROC-AUC and PR-AUC of those scores against the online
model's scores at decision time, on the same payments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataflows.fraud_detection import FRAUD_MODEL
from models.quality import pr_auc, roc_auc

__all__ = ["online_vs_frozen"]


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
