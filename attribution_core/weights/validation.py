"""Which weighting answers each aspect, from validation queries of known attributes.

Learned aspect weights can answer an aspect worse than the general weights or uniform ones
(a model that draws the prompted value half the time teaches its weights half noise). Given
validation queries -- kept apart from the learning and the evaluation queries -- whose
asked attribute values are known, and each query's top-k training examples under every
candidate weighting, the candidate with the highest Recall@k answers the aspect; ties go to
the aspect's own weights, then the general ones, then uniform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attribution_core.evaluation.metrics import bootstrap_ci
from attribution_core.weights.artifact import UNIFORM


def candidates(aspect: str, learned: Sequence[str]) -> list[str]:
    """The weightings that may answer ``aspect``, in the order ties are broken."""
    return [name for name in (aspect, "general") if name in learned] + [UNIFORM]


def choose(recall: dict[str, float], order: list[str]) -> str:
    """The candidate of the highest Recall; the earliest in ``order`` on a tie."""
    return max(order, key=lambda name: (recall[name], -order.index(name)))


def validate(top: np.ndarray, names: list[str], asked: dict[str, Sequence[Any]],
             values: dict[str, dict[str, Any]], resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per aspect of ``asked``: ``{"answered_by", "recall": {candidate: Recall@k},
    "intervals": {candidate: [lo, hi]}, "queries", "k"}``.

    ``top``: ``[Q, C, k]`` example ids (``""`` where a list is short) of each validation
    query under each weighting in ``names`` (learned aspects and ``'uniform'``); ``asked``:
    the value each query asks for; ``values``: every training example's value per aspect.
    """
    out = {}
    for aspect, wanted in asked.items():
        if len(wanted) != top.shape[0]:
            raise ValueError(f"{top.shape[0]} validation queries but {len(wanted)} {aspect} values")
        order = candidates(aspect, names)
        hits = {name: np.array([np.mean([values[aspect].get(i) == wanted[q] for i in top[q, names.index(name)] if i])
                                for q in range(len(wanted))]) for name in order}
        recall = {name: float(h.mean()) for name, h in hits.items()}
        out[aspect] = {"answered_by": choose(recall, order), "queries": len(wanted), "k": int(top.shape[2]),
                       "recall": {name: round(v, 4) for name, v in recall.items()},
                       "intervals": {name: [round(v, 4) for v in bootstrap_ci(h, resamples, seed=seed)]
                                     for name, h in hits.items()}}
    return out
