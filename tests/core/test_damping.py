"""The damping rule's core: candidate queries per damping, the objective, the choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.config import ProjectConfig, from_mapping
from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.damping import candidate_queries, choose_damping, damping_objectives, kernel_blocks
from attribution_core.index.kernel import kernel_from_gram
from tests.core.test_search import layout


def test_candidate_queries_are_each_dampings_preconditioned_uniform_query():
    lay: GroupLayout = layout((3, 5))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((30, lay.k_total))
    grams = [(0, 3, rows[:, :3].T @ rows[:, :3]), (3, 5, rows[:, 3:].T @ rows[:, 3:])]  # block-diagonal
    queries = torch.from_numpy(rng.standard_normal((4, lay.k_total))).float()
    grid = (0.01, 1.0)
    stacked = candidate_queries(queries, lay, grams, grid)
    assert stacked.shape == (8, 1, lay.k_total)
    for i, d in enumerate(grid):
        expected = np.concatenate([queries[:, :3].double().numpy() @ kernel_from_gram(grams[0][2], d)[0],
                                   queries[:, 3:].double().numpy() @ kernel_from_gram(grams[1][2], d)[0]], 1) / 2
        np.testing.assert_allclose(stacked[i * 4 : (i + 1) * 4, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(kernel_blocks(grams, 0.1)) == 2


def test_objective_is_sharpness_and_the_lowest_wins_smallest_on_ties():
    top = torch.tensor([[3.0, 1.0], [2.0, 2.0], [1.0, 1.0], [1.0, 1.0]])  # 2 dampings x 2 queries, top-2 each
    sq = torch.tensor([4.0, 16.0, 1.0, 4.0]).reshape(4, 1, 1)
    obj = damping_objectives(top, sq, (0.1, 1.0))
    assert obj[0.1] == pytest.approx(np.mean([-2.0 / 2, -2.0 / 4]))
    assert obj[1.0] == pytest.approx(np.mean([-1.0 / 1, -1.0 / 2]))
    assert choose_damping(obj) == 0.1
    assert choose_damping({1.0: -0.5, 0.01: -0.5, 0.1: -0.2}) == 0.01


def test_bad_damping_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="index.damping_rule"):
        from_mapping(ProjectConfig, {"index": {"damping_rule": "lds"}})
    with pytest.raises(ConfigError, match="index.damping_grid"):
        from_mapping(ProjectConfig, {"index": {"damping_grid": [0.1, 0.0]}})
    with pytest.raises(ConfigError, match="index.damping_queries"):
        from_mapping(ProjectConfig, {"index": {"damping_queries": 0}})
