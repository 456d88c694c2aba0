"""Scores of the exemplar check (attribution by customization, Wang et al. 2023).

A model fine-tuned briefly on a small exemplar set generates queries that those exemplars
caused, so a correct attribution ranks them at the top of a candidate pool: the exemplars
mixed into a sample of the training set. Per query, from the scores of every candidate
(``scores [Q, C]``, higher is more attributed) and which candidates are exemplars
(``is_exemplar [C]``):

- ``Recall@K``: 1 when an exemplar is among the K highest-scored candidates, else 0;
- ``AP``: the average precision of the exemplars in the whole ranking (its mean over queries
  is mAP).

Ties are broken against the exemplars (a candidate scored equal to an exemplar ranks before
it), so a constant score earns nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attribution_core.errors import InputError
from attribution_core.statistics import bootstrap_ci


def _checked(scores: np.ndarray, is_exemplar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    is_exemplar = np.asarray(is_exemplar, dtype=bool)
    if scores.ndim != 2 or is_exemplar.shape != (scores.shape[1],):
        raise InputError(f"scores must be [queries, candidates] and is_exemplar [candidates]; got "
                         f"{list(scores.shape)} and {list(is_exemplar.shape)}")
    if not is_exemplar.any() or is_exemplar.all():
        raise InputError("the candidates must hold exemplars and other rows: "
                         f"{int(is_exemplar.sum())} exemplars among {len(is_exemplar)} candidates")
    if not np.isfinite(scores).all():
        raise InputError("scores must be finite")
    return scores, is_exemplar


def exemplar_ranks(scores: np.ndarray, is_exemplar: np.ndarray) -> np.ndarray:
    """``[Q, E]``: each exemplar's 1-based rank among the candidates, per query, ascending;
    a candidate scored equal to an exemplar counts as ranked before it."""
    scores, is_exemplar = _checked(scores, is_exemplar)
    ex = -np.sort(-scores[:, is_exemplar], axis=1)  # [Q, E], best first
    others = np.sort(scores[:, ~is_exemplar], axis=1)  # [Q, C - E], ascending
    # Before the i-th best exemplar: the i better exemplars and every other row scored >= it.
    at_or_above = np.stack([others.shape[1] - np.searchsorted(row, e, side="left") for row, e in zip(others, ex)])
    return 1 + np.arange(ex.shape[1])[None, :] + at_or_above


def recall_hits(scores: np.ndarray, is_exemplar: np.ndarray, k: int) -> np.ndarray:
    """``[Q]``: 1.0 where an exemplar is among the query's ``k`` highest-scored candidates."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    return (exemplar_ranks(scores, is_exemplar)[:, 0] <= k).astype(np.float64)


def average_precision(scores: np.ndarray, is_exemplar: np.ndarray) -> np.ndarray:
    """``[Q]``: average precision of the exemplars in each query's ranking,
    ``mean_i (i / rank_i)`` over the exemplars in rank order."""
    ranks = exemplar_ranks(scores, is_exemplar)
    hits = np.arange(1, ranks.shape[1] + 1)[None, :]
    return (hits / ranks).mean(axis=1)


def exemplar_values(scores: np.ndarray, is_exemplar: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hits [Q], ap [Q])``: Recall@k hits and average precision of each query."""
    return recall_hits(scores, is_exemplar, k), average_precision(scores, is_exemplar)


def exemplar_table(columns: dict[str, np.ndarray], is_exemplar: np.ndarray, k: int, *, resamples: int = 2000,
                   seed: int = 0, reference: str | None = "uniform") -> dict[str, dict[str, Any]]:
    """Per column (a weighting, a basis or a baseline: ``scores [Q, C]`` on the same queries
    and candidates): ``recall`` (Recall@k) and ``map`` with 95 % bootstrap intervals over
    queries, and, when ``reference`` is among the columns, each other column's paired
    difference to it (``recall_vs`` / ``map_vs``: mean, low, high)."""
    return summarize({name: exemplar_values(s, is_exemplar, k) for name, s in columns.items()},
                     resamples=resamples, seed=seed, reference=reference)


def summarize(per: dict[str, tuple[np.ndarray, np.ndarray]], *, resamples: int = 2000, seed: int = 0,
              reference: str | None = "uniform") -> dict[str, dict[str, Any]]:
    """The table of ``exemplar_table`` from per-query ``(hits, ap)`` per column (queries of
    several sets concatenated, the same queries in every column)."""
    sizes = {len(r) for r, _ in per.values()}
    if len(sizes) != 1:
        raise InputError(f"every column must score the same queries; got query counts {sorted(sizes)}")
    out: dict[str, dict[str, Any]] = {}
    for name, (hits, ap) in per.items():
        row: dict[str, Any] = {"recall": float(hits.mean()), "recall_ci": list(bootstrap_ci(hits, resamples, seed=seed)),
                               "map": float(ap.mean()), "map_ci": list(bootstrap_ci(ap, resamples, seed=seed)),
                               "queries": int(len(hits))}
        if reference in per and name != reference:
            for key, values, base in (("recall_vs", hits, per[reference][0]), ("map_vs", ap, per[reference][1])):
                diff = values - base
                row[key] = [float(diff.mean()), *bootstrap_ci(diff, resamples, seed=seed)]
        out[name] = row
    return out
