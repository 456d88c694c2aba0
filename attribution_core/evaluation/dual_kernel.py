"""Scores under a full kernel of wide features, in the dual form (evaluation references).

The published pipelines score ``tau(q, x) = g(q)^T (Phi^T Phi + lambda I)^-1 g(x)`` with
``Phi [N, k]`` the training features and k up to 32,768. For N < k the push-through identity
``(Phi^T Phi + lambda I)^-1 Phi^T = Phi^T (Phi Phi^T + lambda I)^-1`` gives every training
example's score from the N x N Gram instead: with ``Phi Phi^T = U diag(s) U^T``,
``scores(q) = (Phi g(q))^T U diag(1 / (s + lambda)) U^T``. One eigendecomposition serves
every damping of a grid.

DAS divides the k x k Gram by the mean absolute value of its entries before adding
``lambda I``; that is the raw form at damping ``c lambda``, scaled by ``c``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from attribution_core.errors import InputError
from attribution_core.evaluation.intervals import spearman_rows
from attribution_core.evaluation.metrics import subset_predictions


def mean_abs_gram(train: torch.Tensor, block: int = 4096) -> float:
    """``mean_ij |(Phi^T Phi)_ij|`` of ``train [N, k]``, ``block`` columns of the k x k Gram at a time."""
    phi = train.double()
    k = phi.shape[1]
    total = sum(float((phi[:, i : i + block].T @ phi).abs().sum()) for i in range(0, k, block))
    return total / (k * k)


class DualKernel:
    """Full-kernel scores of queries against ``train [N, k]``; ``scale`` is 'raw' or
    'mean_abs' (DAS); ``row_scale [N]`` multiplies each training example's score (DAS's r(x))."""

    def __init__(self, train: torch.Tensor, scale: str = "raw", row_scale: torch.Tensor | None = None) -> None:
        if scale not in ("raw", "mean_abs"):
            raise InputError(f"kernel scale must be 'raw' or 'mean_abs', got {scale!r}")
        self.train = train.double()
        self.c = mean_abs_gram(self.train) if scale == "mean_abs" else 1.0
        gram = self.train @ self.train.T  # [N, N]
        self.s, self.u = torch.linalg.eigh(gram)
        self.s = self.s.clamp_min(0.0)  # rounding can leave tiny negative eigenvalues of a PSD Gram
        self.row_scale = None if row_scale is None else row_scale.double()

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """``[..., k]`` -> ``[..., N]``: queries in the eigenbasis, ``(Phi q)^T U`` (linear in q)."""
        return (queries.double() @ self.train.T) @ self.u

    def scores(self, projected: torch.Tensor, damping: float) -> torch.Tensor:
        """``[..., N]`` scores of queries already ``project``-ed, at ``damping`` (lambda)."""
        if damping <= 0:
            raise InputError(f"damping must be > 0, got {damping}")
        out = self.c * ((projected / (self.s + self.c * damping)) @ self.u.T)
        return out * self.row_scale if self.row_scale is not None else out


def cross_fitted_damping(grid: list[float], lds_of: Callable[[float, np.ndarray], np.ndarray],
                         halves: np.ndarray) -> dict[str, object]:
    """The damping of ``grid`` each half of the queries is scored at: the one of the highest
    mean LDS on the *other* half (``lds_of(damping, query mask) -> per-query LDS``); and the
    damping the published code would take, the best over all queries (``oracle``)."""
    per_half = []
    for held in (halves, ~halves):
        fit = ~held
        means = [float(np.nanmean(lds_of(d, fit))) if fit.any() else float("-inf") for d in grid]
        per_half.append(grid[int(np.argmax(means))])
    overall = [float(np.nanmean(lds_of(d, np.ones_like(halves)))) for d in grid]
    best = int(np.argmax(overall))
    return {"dampings": per_half, "oracle": {"damping": grid[best], "lds": overall[best]},
            "by_damping": dict(zip(grid, overall))}


def _weighted_scores(kernel: DualKernel, projected: torch.Tensor, damping: float,
                     weights: torch.Tensor | None) -> torch.Tensor:
    """``[Q, N]`` kernel scores; per-group ``[Q, M, N]`` ones summed under ``weights [M]``."""
    scores = kernel.scores(projected, damping)
    return scores if weights is None else torch.einsum("m,qmn->qn", weights.double(), scores)


def kernel_lds(kernel: DualKernel, projected: torch.Tensor, damping: float, *, weights: torch.Tensor | None,
               masks: np.ndarray, actual: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per-query LDS of the queries ``rows`` (bool ``[Q]``) at ``damping``: ``projected`` is
    ``[Q, N]`` or, with per-group ``weights [M]``, ``[Q, M, N]``; ``masks [S, N]``, ``actual [Q, S]``."""
    scores = _weighted_scores(kernel, projected[torch.from_numpy(rows)], damping, weights)
    return spearman_rows(subset_predictions(scores.numpy(), masks), actual[rows])


def crossed_predictions(kernel: DualKernel, projected: torch.Tensor, dampings: list[float], *,
                        weights: list[torch.Tensor | None], halves: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[Q, S]`` subset predictions, the queries of ``halves`` (and of ``~halves``) scored at
    their own damping and, for ``[Q, M, N]`` inputs, their own group weights."""
    out = np.zeros((projected.shape[0], masks.shape[0]))
    for held, damping, w in zip((halves, ~halves), dampings, weights):
        out[held] = subset_predictions(_weighted_scores(kernel, projected[torch.from_numpy(held)], damping, w).numpy(),
                                       masks)
    return out
