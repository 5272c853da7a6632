"""Quality of a model's scores against labels: ROC-AUC and PR-AUC (average precision), over a
labelled set or prequentially (:class:`Prequential`)."""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
from scipy.stats import rankdata

__all__ = ["Prequential", "pr_auc", "roc_auc"]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The probability that a positive (label 1: an anomaly, a fraud) outscores a negative (ties count half)."""
    ranks = rankdata(scores)  # ties share their average rank
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the precision at each positive, over the positives, highest scores first."""
    hits = labels[np.argsort(-scores, kind="mergesort")] == 1
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


class Prequential:
    """Prequential ROC-AUC and PR-AUC of a model's scores over its last ``window`` labelled
    predictions (a sliding window, so the figures follow drift), recomputed when a label arrives
    at most every ``every_s`` seconds: sorting the window is O(n log n), far too slow per label.
    Both are NaN until the window holds both classes. Picklable, for a model's snapshots."""

    def __init__(self, window: int = 10_000, every_s: float = 2.0) -> None:
        self._recent: deque[tuple[bool, float]] = deque(maxlen=window)
        self._every_s = every_s
        self._due = 0.0  # wall time, so a snapshot resumed in another process stays meaningful
        self.roc_auc = self.pr_auc = math.nan

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, label: bool, score: float) -> bool:
        """Record one prediction's label; ``True`` when the figures were recomputed."""
        self._recent.append((bool(label), float(score)))
        now = time.time()
        if now < self._due:
            return False
        self._due = now + self._every_s
        labels = np.fromiter((y for y, _ in self._recent), dtype=np.int8, count=len(self._recent))
        if 0 < labels.sum() < len(labels):
            scores = np.fromiter((s for _, s in self._recent), dtype=np.float64, count=len(self._recent))
            self.roc_auc, self.pr_auc = roc_auc(labels, scores), pr_auc(labels, scores)
        return True
