"""Headroom of group weighting on an LDS benchmark: the most any weights could gain.

Scores are linear in the weights, ``tau_w(q, x) = sum_m w_m c_m(q, x)``, so a subset's
predicted output under ``w`` is ``sum_m w_m P_m(q, s)`` with ``P_m(q, s) = sum_{x in s}
c_m(q, x)``. Weights ``w = softmax(theta)`` are fitted to the retrained outputs directly
(Pearson correlation across subsets, the differentiable stand-in for LDS's Spearman) on half
of the subsets and half of the queries -- moved from uniform only as far as a split of those
subsets says it generalises -- and LDS is measured on the other half of both; then
the halves swap, and each query keeps the LDS of the fold that held it out. Uniform and the
learned weights are scored on exactly the same held-out halves, so the three compare.

An evaluation-only estimate, not a bound: it reads the ground truth, so it is never a default
and never feeds the learned weights; it fits a Pearson stand-in on a quarter of the subsets'
worth of data per fold, so it can land below uniform on the same halves when the fit does not
generalise. Read it as "what weights fitted to the ground truth reach on other subsets and
queries": a learned row far under it means the objective misses what the features can give;
one near uniform says group weighting gains little here. Its interval resamples each fold's
held-out queries and subsets (``intervals.combined_interval``).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
import torch

from attribution_core.errors import InputError
from attribution_core.evaluation.intervals import TwoWayBootstrap, combined_interval
from attribution_core.evaluation.metrics import lds_per_query
from attribution_core.weights.shrinkage import SHRINKAGE


def subset_sums(contributions: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[M, Q, S]``: each group's summed contribution over each subset's examples, from
    ``contributions [M, Q, N]`` and ``masks bool [S, N]``."""
    return np.einsum("mqn,sn->mqs", contributions, masks.astype(contributions.dtype))


def fit_weights(sums: np.ndarray, actual: np.ndarray, steps: int = 400, learning_rate: float = 0.05) -> np.ndarray:
    """``w [M]`` (non-negative, summing to 1) maximising the mean over queries of the Pearson
    correlation between ``sum_m w_m sums[m, q, :]`` and ``actual [Q, S]``."""
    p = torch.from_numpy(sums).double()  # [M, Q, S]
    y = torch.from_numpy(actual).double()
    y = y - y.mean(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    theta = torch.zeros(p.shape[0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=learning_rate)
    for _ in range(steps):
        optimiser.zero_grad()
        pred = torch.einsum("m,mqs->qs", torch.softmax(theta, 0), p)
        pred = pred - pred.mean(dim=1, keepdim=True)
        pred = pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-12)
        loss = -(pred * y).sum(dim=1).mean()
        loss.backward()
        optimiser.step()
    return torch.softmax(theta.detach(), 0).numpy()


def fit_shrunk(sums: np.ndarray, actual: np.ndarray, rng: np.random.Generator, steps: int = 400) -> tuple[np.ndarray, float]:
    """Fitted weights moved from uniform only as far as helps on subsets the fit did not see:
    ``(1 - a) uniform + a w`` with ``a`` chosen by LDS on half of these subsets after fitting
    on the other half (ties: the smaller move), then ``w`` refitted on all of them.
    Returns the weights and ``a``."""
    m, _, s = sums.shape
    inner = rng.permutation(s) % 2 == 0
    uniform = np.full(m, 1.0 / m)
    w = fit_weights(sums[:, :, inner], actual[:, inner], steps=steps)

    def held_out(a: float) -> float:
        predicted = np.einsum("m,mqs->qs", (1 - a) * uniform + a * w, sums[:, :, ~inner])
        return float(np.nanmean(lds_per_query(predicted, actual[:, ~inner])))

    scores = [held_out(a) for a in SHRINKAGE]
    a = SHRINKAGE[int(np.argmax(scores))]
    return (1 - a) * uniform + a * fit_weights(sums, actual, steps=steps), a


class HeldOut(TypedDict):
    lds: float
    ci: list[float]
    per_query: list[float]


class Headroom(TypedDict):
    """The fitted weights' held-out LDS (``headroom``) and each given weighting's on the same
    halves (``scored``), the weights fitted per fold and how far each moved from uniform."""

    headroom: HeldOut
    scored: dict[str, HeldOut]
    weights: list[list[float]]
    shrinkage: list[float]
    queries: int
    subsets_per_half: int


def headroom(contributions: np.ndarray, masks: np.ndarray, actual: np.ndarray, weights: dict[str, np.ndarray],
             *, seed: int = 0, resamples: int = 2000, steps: int = 400) -> Headroom:
    """Two-fold headroom over halves of subsets and queries.

    ``contributions [M, Q, N]`` per-group scores of every query and universe example;
    ``masks [S, N]``; ``actual [Q, S]`` retrained outputs; ``weights``: named ``[M]`` vectors
    (uniform, learned) scored on the same held-out halves.
    """
    m, q, _ = contributions.shape
    s = masks.shape[0]
    if q < 4 or s < 4:
        raise InputError(f"the headroom needs at least 4 queries and 4 subsets (2 per half), got {q} and {s}")
    rng = np.random.default_rng(seed)
    query_half, subset_half = rng.permutation(q) % 2, rng.permutation(s) % 2
    sums = subset_sums(contributions, masks)
    per_query = {name: np.full(q, np.nan) for name in ("headroom", *weights)}
    blocks: dict[str, list] = {name: [] for name in per_query}  # held-out (bootstrap, predicted, actual) per fold
    fitted, moves = [], []
    for fold in (0, 1):
        fit_q, fit_s = query_half == fold, subset_half == fold
        test_q, test_s = ~fit_q, ~fit_s
        w, a = fit_shrunk(sums[:, fit_q][:, :, fit_s], actual[fit_q][:, fit_s], rng, steps=steps)
        fitted.append(w.tolist())
        moves.append(a)
        boot = TwoWayBootstrap(int(test_q.sum()), int(test_s.sum()), resamples, seed + fold)
        for name, vector in (("headroom", w), *weights.items()):
            predicted = np.einsum("m,mqs->qs", vector, sums[:, test_q][:, :, test_s])
            per_query[name][test_q] = lds_per_query(predicted, actual[test_q][:, test_s])
            blocks[name].append((boot, predicted, actual[test_q][:, test_s]))
    held: dict[str, HeldOut] = {}
    for name, values in per_query.items():
        valid = values[~np.isnan(values)]
        held[name] = HeldOut(lds=float(valid.mean()) if len(valid) else float("nan"),
                             ci=combined_interval(blocks[name]), per_query=values.tolist())
    return Headroom(headroom=held.pop("headroom"), scored=held, weights=fitted, shrinkage=moves, queries=q,
                    subsets_per_half=int(s // 2))
