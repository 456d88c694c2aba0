"""Aspect Recall@K table: aspect weights that look at the right group find the attribute."""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.evaluation.recall import aspect_recall_table
from attribution_core.features.groups import GroupLayout, GroupSpec


def test_aspect_weights_on_the_attribute_group_beat_uniform_and_pixels():
    layout = GroupLayout(groups=(GroupSpec("shape", 0, 16, ()), GroupSpec("noise", 16, 48, ())), layers=(), k_in=1, k_out=1)
    rng = np.random.default_rng(0)
    n, q = 300, 40
    centres = rng.normal(size=(4, 16)) * 3
    train_shape = rng.integers(0, 4, n)
    query_shape = rng.integers(0, 4, q)

    def rows(shapes):
        x = np.concatenate([centres[shapes] + rng.normal(size=(len(shapes), 16)),
                            rng.normal(size=(len(shapes), 48)) * 6], axis=1)  # the shape signal drowns in noise
        return torch.from_numpy(x.astype(np.float32))

    weights = {"groups": ["shape", "noise"], "aspects": {"subject": {"weights": [0.98, 0.02]},
                                                       "general": {"weights": [0.5, 0.5]}}}
    pixels_train = rng.normal(size=(n, 3, 4, 4)).astype(np.float32)  # pixels carry no shape information
    pixels_query = rng.normal(size=(q, 3, 4, 4)).astype(np.float32)
    table = aspect_recall_table(rows(query_shape), layout, None, rows(train_shape), weights=weights,
                                query_attributes={"subject": list(query_shape)}, train_attributes={"subject": list(train_shape), "style": [0] * n},
                                k=10, query_pixels=pixels_query, train_pixels=pixels_train, block=64)
    assert set(table) == {"subject"}
    row = table["subject"]
    assert set(row) == {"aspect", "general", "uniform", "pixel_knn"}
    assert row["aspect"] > 0.9 and row["aspect"] > row["uniform"] + 0.2
    assert row["pixel_knn"] < 0.5  # chance is about 0.25
    # Without learned weights only uniform (and pixels) are reported.
    plain = aspect_recall_table(rows(query_shape), layout, None, rows(train_shape), weights=None,
                                query_attributes={"subject": list(query_shape)}, train_attributes={"subject": list(train_shape)}, k=10)
    assert set(plain["subject"]) == {"uniform"}


def test_recall_intervals_are_over_queries_and_paired_against_uniform():
    import numpy as np

    from attribution_core.evaluation.metrics import recall_hits, recall_intervals

    top = np.array([[0, 1], [2, 3], [0, 2]])
    assert recall_hits(top, ["a", "b", "a"], ["a", "b", "b", "b"]).tolist() == [0.5, 1.0, 0.5]
    hits = {"subject": {"uniform": np.array([0.0, 0.2, 0.4, 0.6]), "aspect": np.array([0.1, 0.3, 0.5, 0.7])}}
    ci = recall_intervals(hits, resamples=500, seed=0)["subject"]
    assert ci["uniform"][0] <= 0.3 <= ci["uniform"][1] and ci["uniform"][0] < ci["uniform"][1]
    assert ci["aspect-uniform"] == [0.1, 0.1, 0.1]  # the same +0.1 for every query: no spread
    assert "uniform-uniform" not in ci
