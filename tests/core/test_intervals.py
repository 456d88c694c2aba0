"""LDS intervals that resample subsets as well as queries, the served choice and the noise
ceiling built on them."""

from __future__ import annotations

import numpy as np
import pytest

from attribution_core.evaluation.intervals import (TwoWayBootstrap, average_ranks, combined_interval, quantiles,
                                                   spearman_rows)
from attribution_core.evaluation.lds_rows import basis_row, noise_ceiling, select_setting, served_choice
from attribution_core.evaluation.metrics import rankdata, spearman
from attribution_core.statistics import bootstrap_ci


def test_vectorised_ranks_and_spearman_match_the_scalar_ones_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(100):
        x = rng.integers(0, 4, size=int(rng.integers(1, 10))).astype(float)
        np.testing.assert_array_equal(average_ranks(x), rankdata(x))
    a, b = rng.integers(0, 3, (7, 6)).astype(float), rng.normal(size=(7, 6))
    a[2] = 1.0  # a constant row has no correlation
    found = spearman_rows(a, b)
    expected = [spearman(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(found, expected, equal_nan=True)
    assert np.isnan(found[2])


def _shared_subsets(q: int = 48, s: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and outputs driven by per-subset effects every query shares (as retrained
    models are), with a little per-query noise."""
    rng = np.random.default_rng(seed)
    signal, other = rng.normal(size=s), rng.normal(size=s)
    predicted = signal[None, :] + 0.1 * rng.normal(size=(q, s))
    actual = 0.5 * signal[None, :] + other[None, :] + 0.1 * rng.normal(size=(q, s))
    return predicted, actual


def test_two_way_intervals_see_the_subsets_that_query_resampling_misses():
    predicted, actual = _shared_subsets()
    boot = TwoWayBootstrap(*predicted.shape, resamples=1000, seed=1)
    per_query = spearman_rows(predicted, actual)
    lo, hi = boot.interval(predicted, actual)
    q_lo, q_hi = bootstrap_ci(per_query, resamples=1000, seed=1)
    assert lo < per_query.mean() < hi
    # every query shares the same 12 subsets: resampling queries alone is far too sure
    assert hi - lo > 4 * (q_hi - q_lo)
    # the same draws pair: a row against itself differs by exactly 0
    assert boot.paired(predicted, predicted, actual) == [0.0, 0.0, 0.0]
    better = boot.paired(predicted + actual, predicted, actual)  # adding the truth helps every query
    assert better[0] > 0 and better[1] > 0
    with pytest.raises(Exception, match="48 queries, 12 subsets"):
        boot.interval(predicted[:5], actual[:5])


def test_combined_interval_weights_blocks_by_their_queries():
    predicted, actual = _shared_subsets(q=20, s=8)
    one = TwoWayBootstrap(20, 8, resamples=300, seed=0)
    same = combined_interval([(one, predicted, actual), (TwoWayBootstrap(20, 8, resamples=300, seed=0), predicted, actual)])
    assert same == pytest.approx(one.interval(predicted, actual))
    assert all(np.isnan(quantiles(np.array([np.nan, np.nan]))))  # every resample undefined: no interval


def test_served_choice_takes_learned_only_when_its_interval_clears_zero():
    predicted, actual = _shared_subsets(q=40, s=16, seed=3)
    boot = TwoWayBootstrap(40, 16, resamples=400, seed=0)
    noise = np.random.default_rng(1).normal(size=predicted.shape)
    worse = predicted + 3 * noise  # learned that hurts
    found = served_choice(boot, predicted, worse, actual, seed=0)
    assert found["weighting"] == "uniform" and found["gain"][0] < 0
    assert found["difference"] == 0.0 and found["difference_ci"] == [0.0, 0.0]  # serving uniform is uniform
    assert found["cross_fitted"]["choices"] == ["uniform", "uniform"]
    better = predicted + actual
    found = served_choice(boot, predicted, better, actual, seed=0)
    assert found["weighting"] == "learned" and found["gain"][1] > 0 and found["lds"] > found["cross_fitted"]["lds"] - 1e-9
    assert found["cross_fitted"]["choices"] == ["learned", "learned"]


def test_basis_row_reports_every_lds_with_a_two_way_interval():
    rng = np.random.default_rng(0)
    n, q, s, m = 30, 12, 8, 3
    masks = rng.random((s, n)) < 0.5
    per_group = rng.normal(size=(m, q, n))
    learned = np.array([0.6, 0.3, 0.1])
    pair = np.stack([per_group.mean(0), np.einsum("m,mqn->qn", learned, per_group)])
    actual = rng.normal(size=(q, s))
    boot = TwoWayBootstrap(q, s, resamples=200, seed=0)
    row, detail = basis_row(pair, masks, actual, boot, seed=0, by_damping={0.1: pair}, per_group=per_group,
                            learned=learned, groups=["a", "b", "c"], headroom_resamples=200)
    for name in ("uniform", "learned"):
        lo, hi = row[f"{name}_ci"]
        assert lo <= row[name] <= hi and len(detail[name]) == q
    assert row["difference"] == pytest.approx(row["learned"] - row["uniform"])
    assert row["damping"][0]["uniform"] == pytest.approx(row["uniform"]) and len(row["damping"][0]["uniform_ci"]) == 2
    assert row["weights"] == {"a": 0.6, "b": 0.3, "c": 0.1}
    room = row["headroom"]
    assert all(np.isfinite(room[k]) for k in ("lds", "uniform", "learned")) and len(room["ci"]) == 2
    assert row["served"]["weighting"] in ("uniform", "learned")


def test_noise_ceiling_of_two_replicas():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(30, 16))
    first, second = signal + 0.5 * rng.normal(size=signal.shape), signal + 0.5 * rng.normal(size=signal.shape)
    boot = TwoWayBootstrap(30, 16, resamples=300, seed=0)
    found = noise_ceiling(boot, first, second, {"signal": signal})
    assert 0.5 < found["agreement"] < 1 and found["ci"][0] < found["agreement"] < found["ci"][1]
    assert found["ceiling"] > found["agreement"]  # sqrt of a correlation below 1
    # the signal itself correlates with one replica about as well as the ceiling says
    assert np.nanmean(spearman_rows(signal, first)) == pytest.approx(found["ceiling"], abs=0.08)
    # against the mean of both replicas the same answer scores higher, under a higher ceiling
    assert found["against_mean"]["signal"]["lds"] > np.nanmean(spearman_rows(signal, first))
    assert found["ceiling_of_mean"] > found["ceiling"]


def test_a_shipped_setting_is_chosen_on_one_half_within_the_byte_budget():
    def setting(bytes_per_row, halves, checkpoints=1):
        return {"bytes_per_row": bytes_per_row, "checkpoints": checkpoints,
                "bases": {"dtrak": {"served_halves": halves}}}

    settings = {"default": setting(100, [0.20, 0.21]), "timesteps-20": setting(100, [0.25, 0.22]),
                "projection-16x16": setting(400, [0.40, 0.41]), "ensemble-4": setting(400, [0.50, 0.45], 4)}
    found = select_setting(settings, "dtrak")
    assert found["chosen"] == "timesteps-20" and found["max_bytes_per_row"] == 200  # 16x16 and the ensemble cost too much
    assert found["second_half"] == {"default": 0.21, "timesteps-20": 0.22}
    assert select_setting(settings, "trak")["chosen"] is None and select_setting(settings, None)["chosen"] is None
