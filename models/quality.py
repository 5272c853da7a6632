"""Quality of a model's outputs against labels: ROC-AUC and PR-AUC (average precision) of scores,
over a labelled set or prequentially (:class:`Prequential`); ranking metrics of retrieval runs
against relevance judgements (:func:`retrieval_metrics`)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "Prequential",
    "hit_rate_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "pr_auc",
    "recall_at_k",
    "retrieval_metrics",
    "roc_auc",
]


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


# -- retrieval: one query's ranking against its relevance judgements (BEIR's qrels) ---------------
# ``ranked`` is the retrieved document ids, best first; ``relevant`` maps document ids to graded
# relevance (> 0 is relevant). Gains are linear in the grade, as in BEIR's pytrec_eval.


def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """Discounted cumulative gain of the top ``k`` over that of the ideal ranking."""
    dcg = sum(relevant.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """The reciprocal rank of the first relevant document in the top ``k`` (0 if none)."""
    return next((1 / (i + 1) for i, doc in enumerate(ranked[:k]) if relevant.get(doc, 0) > 0), 0.0)


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """The share of the relevant documents found in the top ``k``."""
    wanted = {doc for doc, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranked[:k])) / len(wanted) if wanted else 0.0


def hit_rate_at_k(ranked: Sequence[str], relevant: Mapping[str, int], k: int) -> float:
    """1 if any relevant document is in the top ``k``, else 0."""
    return float(any(relevant.get(doc, 0) > 0 for doc in ranked[:k]))


def retrieval_metrics(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """The retrieval eval suite's figures, averaged over the judged queries (a judged query with
    no ranking counts as retrieving nothing): hit rate@1/@10, MRR@10, nDCG@10, recall@10/@100."""
    figures = {
        "hit_rate@1": lambda r, q: hit_rate_at_k(r, q, 1),
        "hit_rate@10": lambda r, q: hit_rate_at_k(r, q, 10),
        "mrr@10": lambda r, q: mrr_at_k(r, q, 10),
        "ndcg@10": lambda r, q: ndcg_at_k(r, q, 10),
        "recall@10": lambda r, q: recall_at_k(r, q, 10),
        "recall@100": lambda r, q: recall_at_k(r, q, 100),
    }
    judged = [qid for qid, rel in qrels.items() if any(g > 0 for g in rel.values())]
    if not judged:
        raise ValueError("no query has a relevant document in the judgements")
    return {name: sum(f(runs.get(qid, ()), qrels[qid]) for qid in judged) / len(judged) for name, f in figures.items()}
