"""Model quality figures: ROC-AUC and PR-AUC (over a labelled set and prequentially), retrieval
metrics, and the BEIR data sets they are computed on."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from models.quality import (
    Prequential,
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    pr_auc,
    recall_at_k,
    retrieval_metrics,
    roc_auc,
)
from scripts import beir
from scripts.evaluate_fraud import threshold_for_precision


def test_roc_and_pr_auc_on_known_rankings() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5  # ties count half
    # positives ranked 1st and 3rd: precision 1/1 and 2/3
    assert pr_auc(labels, np.array([0.5, 0.2, 0.9, 0.3])) == pytest.approx((1 + 2 / 3) / 2)


def test_prequential_figures_cover_the_last_window_of_labels() -> None:
    rng = np.random.default_rng(3)
    quality = Prequential(window=500, every_s=0)
    assert quality.add(False, 0.3) and math.isnan(quality.roc_auc)  # one class: no figure yet
    labels = rng.random(2_000) < 0.1
    scores = np.where(labels, rng.normal(1, 1, 2_000), rng.normal(0, 1, 2_000))
    for y, s in zip(labels, scores, strict=True):
        quality.add(bool(y), float(s))
    assert len(quality) == 500
    assert quality.roc_auc == pytest.approx(roc_auc(labels[-500:].astype(int), scores[-500:]))
    assert quality.pr_auc == pytest.approx(pr_auc(labels[-500:].astype(int), scores[-500:]))
    resumed = pickle.loads(pickle.dumps(quality))  # it lives in a model's snapshots
    assert resumed.roc_auc == quality.roc_auc and len(resumed) == 500


def test_prequential_recomputes_at_most_every_interval() -> None:
    quality = Prequential(every_s=3600)
    assert quality.add(True, 0.9)
    assert not quality.add(False, 0.1)  # recorded, figures not recomputed within the hour
    assert len(quality) == 2 and math.isnan(quality.roc_auc)


def test_retrieval_metrics_of_one_ranking_by_hand() -> None:
    ranked = ["a", "x", "b", "y"]
    relevant = {"a": 1, "b": 2, "c": 1, "z": 0}  # graded; "z" judged not relevant
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, relevant, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(["b", "a", "c"], relevant, 3) == pytest.approx(1.0)
    assert mrr_at_k(["x", "y", "b"], relevant, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "b"], relevant, 2) == 0.0
    assert recall_at_k(ranked, relevant, 10) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, relevant, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(["z", "x"], relevant, 10) == 0.0  # a judged-irrelevant document is no hit


def test_retrieval_metrics_average_the_judged_queries_and_count_missing_runs_as_misses() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}  # q3 has nothing relevant: not averaged
    figures = retrieval_metrics({"q1": ["a", "b"]}, qrels)
    assert figures["hit_rate@1"] == figures["ndcg@10"] == figures["recall@100"] == pytest.approx(0.5)
    assert set(figures) == {"hit_rate@1", "hit_rate@10", "mrr@10", "ndcg@10", "recall@10", "recall@100"}
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics({}, {"q": {"a": 0}})


def test_a_beir_directory_loads_its_corpus_queries_and_splits(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n{"_id": 2, "text": "two"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "which?"}\n{"_id": "q2", "text": "no"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t2\n")
    data = beir.load(tmp_path)
    assert data.corpus == {"d1": {"title": "T", "text": "one"}, "2": {"title": "", "text": "two"}}
    queries, judged = data.split("test")
    assert queries == {"q1": "which?"} and judged == {"q1": {"d1": 1, "2": 2}}
    with pytest.raises(KeyError, match="no split 'train'"):
        data.split("train")
    with pytest.raises(FileNotFoundError, match="not a BEIR directory"):
        beir.load(tmp_path / "qrels")


@pytest.mark.skipif(not beir.SCIFACT.exists(), reason="SciFact is in the workspace's shared data")
def test_scifact_is_whole_and_a_perfect_run_scores_one() -> None:
    data = beir.load()
    assert len(data.corpus) == 5_183 and len(data.queries) == 1_109
    queries, judged = data.split("test")
    assert len(queries) == 300
    assert all(doc in data.corpus for rel in judged.values() for doc in rel)
    perfect = {qid: sorted(rel, key=lambda d: -rel[d]) for qid, rel in judged.items()}
    assert retrieval_metrics(perfect, judged)["ndcg@10"] == pytest.approx(1.0)


def test_the_threshold_for_a_precision_is_the_lowest_that_keeps_it() -> None:
    scores = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4]
    labels = [1, 1, 0, 1, 0, 0, 1]
    outcomes = [{"score": s, "label": y} for s, y in zip(scores, labels, strict=True)]
    # blocking at 0.9: 1/1; at 0.8: 2/3 (the tie counts whole); at 0.7: 3/4; at 0.6: 3/5; at 0.4: 4/7
    assert threshold_for_precision(outcomes, 0.75) == {
        "threshold": 0.7,
        "precision": 0.75,
        "recall": 0.75,
        "blocked_share": round(4 / 7, 4),
    }
    assert threshold_for_precision(outcomes, 1.0) == {
        "threshold": 0.9,
        "precision": 1.0,
        "recall": 0.25,
        "blocked_share": round(1 / 7, 4),
    }
    assert threshold_for_precision([{"score": 0.5, "label": 0}], 0.5) is None
