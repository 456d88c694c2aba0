"""The LDS headroom row: weights fitted to retrained outputs on halves, scored on the others."""

from __future__ import annotations

import numpy as np
import pytest

from attribution_core.errors import InputError
from attribution_core.evaluation.headroom import fit_weights, headroom, subset_sums
from attribution_core.evaluation.metrics import lds_per_query, subset_masks


def _benchmark(seed: int = 0, m: int = 3, q: int = 16, n: int = 60, s: int = 24):
    """Group 0 holds each example's true effect on each query; groups 1.. are noise 5x larger."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=(q, n))
    contributions = np.concatenate([effect[None], 5 * rng.normal(size=(m - 1, q, n))])
    masks = subset_masks(n, s, 0.5, seed)
    actual = effect @ masks.T.astype(float) + 0.5 * rng.normal(size=(q, s))
    return contributions, masks, actual


def test_subset_sums_are_each_groups_summed_scores():
    contributions, masks, _ = _benchmark()
    sums = subset_sums(contributions, masks)
    np.testing.assert_allclose(sums[1, 3, 5], contributions[1, 3][masks[5]].sum())


def test_fitted_weights_find_the_group_that_predicts_retraining_and_beat_uniform_on_held_out_halves():
    contributions, masks, actual = _benchmark()
    m = contributions.shape[0]
    w = fit_weights(subset_sums(contributions, masks), actual)
    assert w[0] > 0.9 and abs(w.sum() - 1) < 1e-9
    found = headroom(contributions, masks, actual, {"uniform": np.full(m, 1 / m), "learned": np.array([0.0, 0.5, 0.5])},
                     resamples=200)
    assert found["headroom"]["lds"] > found["scored"]["uniform"]["lds"] + 0.2 > found["scored"]["learned"]["lds"] + 0.2
    assert found["subsets_per_half"] == 12 and len(found["weights"]) == 2
    assert found["shrinkage"] == [1.0, 1.0]  # a signal this clear generalises: no pull back toward uniform
    assert not np.isnan(found["headroom"]["per_query"]).any()  # every query scored by the fold that held it out
    # Each held-out LDS is the plain LDS of that weighting on those halves: recompute one query by hand.
    rng = np.random.default_rng(0)
    query_half, subset_half = rng.permutation(16) % 2, rng.permutation(24) % 2
    q = int(np.flatnonzero(query_half == 1)[0])  # held out by fold 0, scored on fold 0's other subsets
    held = subset_half == 1
    predicted = (np.full(m, 1 / m) @ contributions[:, q]) @ masks[held].T.astype(float)
    assert found["scored"]["uniform"]["per_query"][q] == pytest.approx(lds_per_query(predicted[None], actual[q][held][None])[0])


def test_no_room_when_every_group_is_the_same():
    contributions, masks, actual = _benchmark(m=1)
    same = np.repeat(contributions, 3, axis=0)
    found = headroom(same, masks, actual, {"uniform": np.full(3, 1 / 3)}, resamples=100)
    assert found["headroom"]["lds"] == pytest.approx(found["scored"]["uniform"]["lds"])


def test_too_few_subsets_or_queries():
    contributions, masks, actual = _benchmark(q=3)
    with pytest.raises(InputError, match="at least 4 queries and 4 subsets"):
        headroom(contributions, masks, actual, {})
