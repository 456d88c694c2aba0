"""Intervals of LDS that resample retrained subsets as well as queries.

Every LDS query is scored against the same S subsets and their retrained models, so the
per-query Spearman values share the subsets' draw and retraining noise; a bootstrap over
queries alone leaves that variance out and its intervals are too narrow. Here each resample
draws Q queries and S subsets with replacement (the two-way, or "pigeonhole", bootstrap of
crossed designs), recomputes every drawn query's Spearman correlation over the drawn subsets
(ties, including repeated subsets, share their average rank) and averages over the drawn
queries. Two-way resampling counts the interaction term twice, so its intervals err wide,
not narrow.

Paired differences (learned - uniform, ours - a reference) use the same draws for both
sides, so what both share cancels.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from attribution_core.errors import InputError

LEVEL = 0.95


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n along the last axis, ties sharing their average rank (any leading shape)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    position = np.broadcast_to(np.arange(n), values.shape)
    new_run = np.ones(values.shape, dtype=bool)
    new_run[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    first = np.maximum.accumulate(np.where(new_run, position, 0), axis=-1)  # start of each tie run
    ends_run = np.ones(values.shape, dtype=bool)
    ends_run[..., :-1] = new_run[..., 1:]
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends_run, position, n), -1), axis=-1), -1)
    ranks = np.empty(values.shape)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=-1)
    return ranks


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of ``a`` and ``b`` along the last axis (NaN where either is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean(axis=-1, keepdims=True)
    rb -= rb.mean(axis=-1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(-1) / np.where(denom > 0, denom, 1), np.nan)


@dataclasses.dataclass
class TwoWayBootstrap:
    """Fixed resamples of ``queries`` x ``subsets``: every interval drawn from one instance
    uses the same draws, so paired intervals pair."""

    queries: int
    subsets: int
    resamples: int = 2000
    seed: int = 0
    chunk: int = 250  # resamples ranked at once ([chunk, Q, S] arrays)

    def __post_init__(self) -> None:
        if self.queries < 1 or self.subsets < 2:
            raise InputError(f"a two-way bootstrap needs >= 1 query and >= 2 subsets, got {self.queries} and "
                             f"{self.subsets}")
        rng = np.random.default_rng(self.seed)
        self.query_draws = rng.integers(0, self.queries, size=(self.resamples, self.queries))  # [B, Q]
        self.subset_draws = rng.integers(0, self.subsets, size=(self.resamples, self.subsets))  # [B, S]

    def _check(self, predicted: np.ndarray, actual: np.ndarray) -> None:
        if predicted.shape != (self.queries, self.subsets) or actual.shape != predicted.shape:
            raise InputError(f"predicted {predicted.shape} and actual {actual.shape} must both be "
                             f"[{self.queries} queries, {self.subsets} subsets]")

    def per_query(self, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
        """``[B, Q]``: each resample's drawn queries' Spearman over its drawn subsets."""
        predicted, actual = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
        self._check(predicted, actual)
        out = np.empty((self.resamples, self.queries))
        for start in range(0, self.resamples, self.chunk):
            q = self.query_draws[start : start + self.chunk]  # [b, Q]
            s = self.subset_draws[start : start + self.chunk]  # [b, S]
            pick = (q[:, :, None], s[:, None, :])  # -> [b, Q, S]
            out[start : start + len(q)] = spearman_rows(predicted[pick], actual[pick])
        return out

    def means(self, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
        """``[B]`` resampled LDS (NaN where every drawn query was constant)."""
        per_query = self.per_query(predicted, actual)
        with warnings.catch_warnings():  # a resample whose drawn queries are all constant is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(per_query, axis=1)

    def interval(self, predicted: np.ndarray, actual: np.ndarray) -> list[float]:
        """The 95 % interval of LDS of ``predicted [Q, S]`` against ``actual [Q, S]``."""
        return quantiles(self.means(predicted, actual))

    def paired(self, predicted_a: np.ndarray, predicted_b: np.ndarray, actual: np.ndarray) -> list[float]:
        """``[mean, lo, hi]`` of LDS(a) - LDS(b) over the same queries and subsets: the mean on
        the data as it is, the interval from the paired resamples."""
        a, b = self.per_query(predicted_a, actual), self.per_query(predicted_b, actual)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            draws = np.nanmean(a - b, axis=1)
            point = np.nanmean(spearman_rows(predicted_a, actual) - spearman_rows(predicted_b, actual))
        return [float(point), *quantiles(draws)]


def quantiles(draws: np.ndarray, level: float = LEVEL) -> list[float]:
    """The percentile interval of resampled statistics (NaN resamples dropped)."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2
    return [float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))]


def combined_interval(parts: list[tuple[TwoWayBootstrap, np.ndarray, np.ndarray]]) -> list[float]:
    """The interval of the query-weighted mean LDS over disjoint blocks (e.g. the two folds
    of a cross-fit, each its own queries x subsets), each block resampled two ways."""
    if not parts:
        raise InputError("no blocks to combine")
    if len({boot.resamples for boot, _, _ in parts}) != 1:
        raise InputError("blocks must be resampled the same number of times")
    total = sum(boot.queries for boot, _, _ in parts)
    draws = sum(boot.means(p, a) * boot.queries for boot, p, a in parts) / total
    return quantiles(draws)
