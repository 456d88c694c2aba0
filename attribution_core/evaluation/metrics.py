"""Attribution quality metrics (ARCHITECTURE §9): LDS with a bootstrap interval, aspect Recall@K,
and the pixel-space nearest-neighbour baseline.

LDS (Park et al. 2023, the D-TRAK protocol): S random subsets of the training set, a model
retrained on each; for a query q, the prediction for subset s is the summed attribution
``sum_{n in s} tau(q, n)`` and the truth is the retrained model's output on q. LDS is the
mean over queries of the Spearman rank correlation between the two across subsets.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypedDict

import numpy as np

from attribution_core.errors import InputError
from attribution_core.statistics import bootstrap_ci


def subset_masks(n: int, subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``bool [subsets, n]``: each row keeps ``round(fraction * n)`` examples drawn without
    replacement; deterministic from ``seed``."""
    if n < 2 or subsets < 2:
        raise InputError(f"LDS needs at least 2 examples and 2 subsets, got n={n}, subsets={subsets}")
    if not 0 < fraction < 1:
        raise InputError(f"subset fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * n))
    masks = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        masks[s, rng.choice(n, size=size, replace=False)] = True
    return masks


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two 1-D arrays; NaN when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def subset_predictions(attributions: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[Q, S]``: summed attribution of each subset, from ``attributions [Q, N]`` and ``masks [S, N]``."""
    return np.asarray(attributions, dtype=np.float64) @ masks.T.astype(np.float64)


def lds_per_query(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation per query of ``predicted [Q, S]`` against ``actual [Q, S]``."""
    if predicted.shape != actual.shape:
        raise InputError(f"predicted {predicted.shape} and actual {actual.shape} outputs differ in shape")
    return np.array([spearman(p, a) for p, a in zip(predicted, actual)])


class Lds(TypedDict):
    """LDS with a bootstrap interval over queries, the queries scored, the per-query values."""

    lds: float
    ci: list[float]
    queries: int
    per_query: list[float]


def lds(attributions: np.ndarray, masks: np.ndarray, actual: np.ndarray, *, seed: int = 0,
        resamples: int = 2000) -> Lds:
    """LDS of ``attributions [Q, N]`` against retrained outputs ``actual [Q, S]`` on subsets
    ``masks [S, N]``: mean, bootstrap interval over queries, and the per-query values."""
    per_query = lds_per_query(subset_predictions(attributions, masks), actual)
    lo, hi = bootstrap_ci(per_query, resamples=resamples, seed=seed)
    valid = per_query[~np.isnan(per_query)]
    return {"lds": float(valid.mean()) if len(valid) else float("nan"), "ci": [lo, hi],
            "queries": int(len(valid)), "per_query": per_query.tolist()}


def recall_hits(top: np.ndarray, query_values: list[Any], train_values: list[Any]) -> np.ndarray:
    """``[Q]``: per query, the fraction of its top-k training rows (``top [Q, k]``, row
    indices) whose attribute equals the query's."""
    if len(top) != len(query_values):
        raise InputError(f"{len(top)} top-k lists for {len(query_values)} queries")
    return np.array([np.mean([train_values[j] == query_values[q] for j in row]) for q, row in enumerate(np.asarray(top))])


def recall_at_k(top: np.ndarray, query_values: list[Any], train_values: list[Any]) -> float:
    """Mean over queries of ``recall_hits``."""
    hits = recall_hits(top, query_values, train_values)
    return float(np.mean(hits)) if len(hits) else float("nan")


def recall_intervals(hits: dict[str, dict[str, np.ndarray]], resamples: int = 2000,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per aspect and column, the 95 % bootstrap interval of Recall over queries, and for every
    column but uniform the paired interval of (column - uniform), the test of a win."""
    out: dict[str, dict[str, Any]] = {}
    for aspect, columns in hits.items():
        row: dict[str, Any] = {}
        for name, values in columns.items():
            row[name] = [round(v, 4) for v in bootstrap_ci(values, resamples, seed=seed)]
            if name != "uniform" and "uniform" in columns:
                diff = np.asarray(values, dtype=np.float64) - np.asarray(columns["uniform"], dtype=np.float64)
                row[f"{name}-uniform"] = [round(float(diff.mean()), 4),
                                          *(round(v, 4) for v in bootstrap_ci(diff, resamples, seed=seed))]
        out[aspect] = row
    return out


def pixel_knn(queries: np.ndarray, train: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """``[Q, k]`` indices of the k training images nearest each query in pixel space
    (Euclidean over the flattened, equally sized images): the baseline attribution."""
    q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    best_d = np.full((len(q), 0), np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    q_sq = (q * q).sum(1, keepdims=True)
    for start in range(0, len(train), block):
        x = np.asarray(train[start : start + block], dtype=np.float32).reshape(-1, q.shape[1])
        d = q_sq - 2 * q @ x.T + (x * x).sum(1)[None, :]  # [Q, B] squared distances
        d = np.concatenate([best_d, d], axis=1)
        i = np.concatenate([best_i, np.arange(start, start + len(x))[None, :].repeat(len(q), 0)], axis=1)
        keep = np.argsort(d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def ground_truth_key(recipe: dict[str, Any], masks: np.ndarray, query_ids: list[str]) -> str:
    """Cache key of retrained outputs: the training recipe, the exact subsets and the queries."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(recipe, sort_keys=True, default=str).encode())
    h.update(np.packbits(masks, axis=1).tobytes())
    h.update(str(masks.shape).encode())
    for qid in query_ids:
        h.update(qid.encode() + b"\x00")
    return h.hexdigest()
