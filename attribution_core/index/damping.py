"""The kernel's damping chosen without retraining (``index.damping_rule: objective``).

TRAK-style kernels ``K = (C + lambda I)^-1`` need a damping, and the best one differs by
basis and dataset (on the benchmark: 1.0 for TRAK, 0.01 for D-TRAK). Retraining to measure
LDS is what a user cannot afford, so the index job picks, from a grid, the damping under
which images the model generates attribute most sharply: the paper's weight objective at
uniform weights, ``mean_q -mean(top-k_x tau(q, x)) / ||tau(q, .)||_2`` (lower is sharper).
One scan of the index scores every query under every candidate at once: the candidates'
preconditioned queries are stacked as rows with one group (``M = 1``), so the scan's top-k
and moment matrix (``||tau(q, .)||^2``) are exactly what the objective needs.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.features.groups import GroupLayout
from attribution_core.index.kernel import kernel_from_gram
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.weights.shrinkage import heldout_objective


def kernel_blocks(grams: list[tuple[int, int, np.ndarray]], damping: float) -> list[tuple[int, int, torch.Tensor]]:
    """``(offset, dim, K_b)`` blocks from ``(offset, dim, C_b)`` Gram blocks at ``damping``."""
    return [(offset, dim, torch.from_numpy(kernel_from_gram(gram, damping)[0])) for offset, dim, gram in grams]


def candidate_queries(queries: torch.Tensor, layout: GroupLayout, grams: list[tuple[int, int, np.ndarray]],
                      grid: tuple[float, ...]) -> torch.Tensor:
    """``Tensor[D * Q, 1, k_total]``: ``K_d (w . g(q))`` at uniform w for each damping ``d`` of
    ``grid`` (damping-major), shaped as single-group queries for the index scan."""
    m = len(layout.groups)
    uniform = torch.full((1, m), 1.0 / m)
    rows = [preconditioned_queries(queries, uniform, layout, kernel_blocks(grams, d))[0] for d in grid]  # [Q, k] each
    return torch.cat(rows).unsqueeze(1)


def damping_objectives(top_scores: torch.Tensor, sq_norms: torch.Tensor, grid: tuple[float, ...]) -> dict[float, float]:
    """``{damping: objective}`` from the scan of ``candidate_queries``: ``top_scores [D * Q, k]``
    and ``sq_norms [D * Q, 1, 1]`` (each query's ``||tau(q, .)||^2``)."""
    q = top_scores.shape[0] // len(grid)
    one = torch.ones(1, dtype=torch.float64)
    return {d: heldout_objective(top_scores[i * q : (i + 1) * q], sq_norms[i * q : (i + 1) * q], one, 0.0)
            for i, d in enumerate(grid)}


def choose_damping(objective: dict[float, float]) -> float:
    """The damping of the lowest objective; the smallest such damping on a tie."""
    return min(sorted(objective), key=lambda d: objective[d])
