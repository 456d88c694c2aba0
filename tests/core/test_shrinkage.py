"""Shrinkage toward uniform: the held-out objective is the paper's objective, and the move
of the lowest value (the smaller on a tie) is kept."""

from __future__ import annotations

import pytest
import torch

from attribution_core.weights.objective import full_cache_objective
from attribution_core.index.scoring import heldout_objective
from attribution_core.weights.shrinkage import SHRINKAGE, choose_shrinkage, shrunk


def test_shrunk_weights_run_from_uniform_to_the_learned_ones():
    w = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    assert torch.allclose(shrunk(w, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.equal(shrunk(w, 1.0), w)
    assert shrunk(w, 0.5).sum().item() == pytest.approx(1.0) and SHRINKAGE[0] == 0.0 and SHRINKAGE[-1] == 1.0


def test_heldout_objective_equals_the_full_cache_objective():
    torch.manual_seed(0)
    cache = torch.randn(6, 50, 4, dtype=torch.float64)  # [Q, N, M] per-group contributions
    theta = torch.tensor([0.3, -1.0, 0.5, 0.0], dtype=torch.float64)
    w = torch.softmax(theta, 0)
    top = torch.topk(cache @ w, 5, dim=1).values  # [Q, k]
    noise = torch.einsum("qnm,qnl->qml", cache, cache)  # sum_x c c^T
    assert heldout_objective(top, noise, w, 0.01) == pytest.approx(float(full_cache_objective(theta, cache, 5, 0.01)),
                                                                    rel=1e-12)


def test_the_lowest_objective_wins_and_ties_keep_the_smaller_move():
    assert choose_shrinkage({0.0: -0.5, 0.25: -0.7, 0.5: -0.6, 0.75: -0.2, 1.0: 0.1}) == 0.25
    assert choose_shrinkage({1.0: -0.7, 0.5: -0.7, 0.0: -0.1}) == 0.5
