"""Model quality figures: ROC-AUC and PR-AUC, over a labelled set and prequentially."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from models.quality import Prequential, pr_auc, roc_auc


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
