"""The kernel rule's core: candidate queries per (structure, damping), Gram slices, the objective, the choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.config import ProjectConfig, from_mapping
from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout, GroupSpec, TrackedLayer
from attribution_core.index.damping import candidate_objectives, candidate_queries, choose_candidate, kernel_blocks
from attribution_core.index.kernel import (BLOCK_DIAGONAL, FULL, LAYER_BLOCK, blocks, coarsest, kernel_candidates,
                                           kernel_from_gram, sub_grams)
from tests.core.test_search import layout


def two_layer_groups() -> GroupLayout:
    """Group a = layers l0 (2) + l1 (3), group b = layer l2 (4)."""
    layers = tuple(TrackedLayer(name, "linear", 1, 1, False, group, offset, dim) for name, group, offset, dim in
                   (("l0", "a", 0, 2), ("l1", "a", 2, 3), ("l2", "b", 5, 4)))
    return GroupLayout(groups=(GroupSpec("a", 0, 5, ("l0", "l1")), GroupSpec("b", 5, 4, ("l2",))), layers=layers,
                       k_in=1, k_out=1)


def test_candidate_queries_are_each_candidates_preconditioned_uniform_query():
    lay: GroupLayout = layout((3, 5))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((30, lay.k_total))
    grams = {BLOCK_DIAGONAL: [(0, 3, rows[:, :3].T @ rows[:, :3]), (3, 5, rows[:, 3:].T @ rows[:, 3:])],
             FULL: [(0, 8, rows.T @ rows)]}
    queries = torch.from_numpy(rng.standard_normal((4, lay.k_total))).float()
    candidates = [(FULL, 0.1), (BLOCK_DIAGONAL, 0.01), (BLOCK_DIAGONAL, 1.0)]
    stacked = candidate_queries(queries, lay, grams, candidates)
    assert stacked.shape == (12, 1, lay.k_total)
    q = queries.double().numpy()
    np.testing.assert_allclose(stacked[:4, 0].numpy(), q @ kernel_from_gram(rows.T @ rows, 0.1)[0] / 2, rtol=1e-5, atol=1e-6)
    for i, d in ((1, 0.01), (2, 1.0)):
        expected = np.concatenate([q[:, :3] @ kernel_from_gram(grams[BLOCK_DIAGONAL][0][2], d)[0],
                                   q[:, 3:] @ kernel_from_gram(grams[BLOCK_DIAGONAL][1][2], d)[0]], 1) / 2
        np.testing.assert_allclose(stacked[i * 4 : (i + 1) * 4, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(kernel_blocks(grams[BLOCK_DIAGONAL], 0.1)) == 2


def test_layer_blocks_are_slices_of_the_group_and_full_grams():
    lay = two_layer_groups()
    rows = np.random.default_rng(1).standard_normal((20, lay.k_total))
    full = [("all", 0, lay.k_total, rows.T @ rows)]
    assert [b[1:] for b in blocks(lay, LAYER_BLOCK)] == [(0, 2), (2, 3), (5, 4)]
    for kind in (BLOCK_DIAGONAL, LAYER_BLOCK):
        for name, offset, dim, gram in sub_grams(full, lay, kind):
            np.testing.assert_array_equal(gram, rows[:, offset : offset + dim].T @ rows[:, offset : offset + dim])
    by_group = sub_grams(full, lay, BLOCK_DIAGONAL)
    assert [g[0] for g in sub_grams(by_group, lay, LAYER_BLOCK)] == ["l0", "l1", "l2"]
    with pytest.raises(ValueError, match="lies in no Gram block"):
        sub_grams(sub_grams(full, lay, LAYER_BLOCK), lay, BLOCK_DIAGONAL)  # groups are not inside layers
    assert kernel_candidates("objective", 9, 100) == [FULL, BLOCK_DIAGONAL, LAYER_BLOCK]
    assert kernel_candidates("objective", 9, 4) == [BLOCK_DIAGONAL, LAYER_BLOCK]
    assert kernel_candidates("auto", 9, 4) == [BLOCK_DIAGONAL] and kernel_candidates("auto", 9, 9) == [FULL]
    assert coarsest([LAYER_BLOCK, BLOCK_DIAGONAL]) == BLOCK_DIAGONAL


def test_objective_is_sharpness_and_the_lowest_wins_first_on_ties():
    top = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0]])  # 2 candidates x 2 queries, top-2 each
    sq = torch.tensor([4.0, 16.0, 1.0, 4.0]).reshape(4, 1, 1)
    obj = candidate_objectives(top, sq, [("full", 0.1), ("full", 1.0)])
    assert obj[("full", 0.1)] == pytest.approx(np.mean([-2.0 / 2, -2.0 / 4]))
    assert obj[("full", 1.0)] == pytest.approx(np.mean([-1.0 / 1, -1.0 / 2]))
    assert choose_candidate(obj) == ("full", 0.1)
    assert choose_candidate({("a", 0.01): -0.5, ("a", 1.0): -0.5, ("b", 0.1): -0.2}) == ("a", 0.01)


def test_bad_kernel_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="index.damping_rule"):
        from_mapping(ProjectConfig, {"index": {"damping_rule": "lds"}})
    with pytest.raises(ConfigError, match="index.damping_grid"):
        from_mapping(ProjectConfig, {"index": {"damping_grid": [0.1, 0.0]}})
    with pytest.raises(ConfigError, match="index.damping_queries"):
        from_mapping(ProjectConfig, {"index": {"damping_queries": 0}})
    with pytest.raises(ConfigError, match="index.kernel"):
        from_mapping(ProjectConfig, {"index": {"kernel": "diagonal"}})
