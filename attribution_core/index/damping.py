"""The kernel's damping (and structure) chosen without retraining (``index.damping_rule:
objective``, ``index.kernel: objective``).

TRAK-style kernels ``K = (C + lambda I)^-1`` need a damping, and the best one differs by
basis and dataset (on the benchmark: 1.0 for TRAK, 0.01 for D-TRAK). Retraining to measure
LDS is what a user cannot afford, so the index job picks, from a grid, the damping under
which images the model generates attribute most sharply: the paper's weight objective at
uniform weights, ``mean_q -mean(top-k_x tau(q, x)) / ||tau(q, .)||_2`` (lower is sharper).
The same objective chooses the kernel's block structure (group blocks, layer blocks, full)
when asked. One scan of the index scores every query under every candidate at once: the
candidates' preconditioned queries are stacked as rows with one group (``M = 1``), so the
scan's top-k and moment matrix (``||tau(q, .)||^2``) are exactly what the objective needs.
"""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.features.groups import GroupLayout
from attribution_core.index.kernel import GramEigen, kernel_from_gram
from attribution_core.index.scoring import heldout_objective, weighted_queries


def kernel_blocks(grams: list[tuple[int, int, np.ndarray]], damping: float) -> list[tuple[int, int, torch.Tensor]]:
    """``(offset, dim, K_b)`` blocks from ``(offset, dim, C_b)`` Gram blocks at ``damping``."""
    return [(offset, dim, torch.from_numpy(kernel_from_gram(gram, damping)[0])) for offset, dim, gram in grams]


Candidate = tuple[str, float]
"""(kernel structure, damping)."""


def candidate_queries(queries: torch.Tensor, layout: GroupLayout,
                      grams: dict[str, list[tuple[int, int, np.ndarray]]], candidates: list[Candidate]) -> torch.Tensor:
    """``Tensor[C * Q, 1, k_total]``: ``K_c (w . g(q))`` at uniform w for each candidate ``c``
    (kernel structure, damping), candidate-major, shaped as single-group queries for the
    index scan. ``grams``: each structure's ``(offset, dim, C_b)`` blocks."""
    m = len(layout.groups)
    weighted = weighted_queries(queries.double(), torch.full((1, m), 1.0 / m, dtype=torch.float64), layout)[0].numpy()
    eigen: dict[tuple[str, int], GramEigen] = {}  # one decomposition per block, reused at every damping
    rows = []
    for kind, d in candidates:
        row = weighted.copy()  # [Q, k]
        for offset, dim, gram in grams[kind]:
            sl = slice(offset, offset + dim)
            row[:, sl] = eigen.setdefault((kind, offset), GramEigen(gram)).apply(weighted[:, sl], d)
        rows.append(torch.from_numpy(row).float())
    return torch.cat(rows).unsqueeze(1)


def candidate_objectives(top_scores: torch.Tensor, sq_norms: torch.Tensor,
                         candidates: list[Candidate]) -> dict[Candidate, float]:
    """``{candidate: objective}`` from the scan of ``candidate_queries``: ``top_scores [C * Q, k]``
    and ``sq_norms [C * Q, 1, 1]`` (each query's ``||tau(q, .)||^2``)."""
    q = top_scores.shape[0] // len(candidates)
    one = torch.ones(1, dtype=torch.float64)
    return {c: heldout_objective(top_scores[i * q : (i + 1) * q], sq_norms[i * q : (i + 1) * q], one, 0.0)
            for i, c in enumerate(candidates)}


def choose_candidate(objective: dict[Candidate, float]) -> Candidate:
    """The candidate of the lowest objective; on a tie the first in ``objective``'s order
    (the callers list structures coarse to fine, each with its dampings ascending)."""
    return min(objective, key=lambda c: objective[c])
