"""Evaluation metrics: LDS and its parts, bootstrap intervals, Recall@K, pixel kNN."""

from __future__ import annotations

import numpy as np
import pytest

from attribution_core.evaluation.metrics import (ground_truth_key, lds, pixel_knn, rankdata, recall_at_k, spearman,
                                                 subset_masks)
from attribution_core.statistics import bootstrap_ci


def test_subsets_are_deterministic_halves():
    a, b = subset_masks(101, 8, 0.5, seed=3), subset_masks(101, 8, 0.5, seed=3)
    assert a.shape == (8, 101) and (a == b).all() and (a.sum(1) == 50).all()
    assert not (a == subset_masks(101, 8, 0.5, seed=4)).all()
    with pytest.raises(Exception, match="fraction"):
        subset_masks(10, 4, 1.0)


def test_ranks_and_spearman_with_ties():
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(5)))
    # Against the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)) without ties.
    rng = np.random.default_rng(0)
    a, b = rng.permutation(20).astype(float), rng.permutation(20).astype(float)
    d = rankdata(a) - rankdata(b)
    assert spearman(a, b) == pytest.approx(1 - 6 * (d**2).sum() / (20 * (20**2 - 1)))


def test_lds_is_one_for_attributions_that_explain_the_outputs_and_near_zero_for_noise():
    rng = np.random.default_rng(1)
    n, s, q = 60, 32, 12
    masks = subset_masks(n, s, seed=2)
    true_effect = rng.normal(size=(q, n))  # each example's additive effect on each query's output
    actual = true_effect @ masks.T.astype(float)  # [Q, S]: a model whose output is additive
    exact = lds(true_effect, masks, actual)
    assert exact["lds"] == pytest.approx(1.0) and exact["queries"] == q
    noise = lds(rng.normal(size=(q, n)), masks, actual)
    assert abs(noise["lds"]) < 0.3
    lo, hi = noise["ci"]
    assert lo <= noise["lds"] <= hi


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(5)
    small, large = rng.normal(0.4, 0.2, 20), rng.normal(0.4, 0.2, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < hi_s - lo_s


def test_recall_at_k_and_pixel_knn():
    train = np.stack([np.full((3, 4, 4), v, dtype=np.float32) for v in (0.0, 0.1, 0.9, 1.0, 0.5)])
    queries = np.stack([np.full((3, 4, 4), 0.05, dtype=np.float32), np.full((3, 4, 4), 0.95, dtype=np.float32)])
    top = pixel_knn(queries, train, k=2, block=2)  # blocks smaller than N: the merge is exercised
    assert [sorted(r) for r in top.tolist()] == [[0, 1], [2, 3]]
    labels = ["dark", "dark", "light", "light", "mid"]
    assert recall_at_k(top, ["dark", "light"], labels) == 1.0
    assert recall_at_k(np.array([[0, 4], [4, 4]]), ["dark", "light"], labels) == 0.25


def test_ground_truth_key_changes_with_recipe_subsets_or_queries():
    masks = subset_masks(30, 4, seed=0)
    key = ground_truth_key({"steps": 400}, masks, ["q1", "q2"])
    assert key == ground_truth_key({"steps": 400}, masks.copy(), ["q1", "q2"])
    assert key != ground_truth_key({"steps": 401}, masks, ["q1", "q2"])
    assert key != ground_truth_key({"steps": 400}, subset_masks(30, 4, seed=1), ["q1", "q2"])
    assert key != ground_truth_key({"steps": 400}, masks, ["q1", "q3"])
