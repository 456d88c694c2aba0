"""Which weighting answers each aspect, from validation queries of known attributes.

Learned aspect weights can answer an aspect worse than the general weights or uniform ones
(a model that draws the prompted value half the time teaches its weights half noise). Given
validation queries -- kept apart from the learning and the evaluation queries -- whose
asked attribute values are known, and each query's top-k training examples under every
candidate weighting, Recall@k of the asked value is measured per candidate and the rule of
``choice`` picks the answer: uniform unless a learned candidate's paired interval against
uniform lies above zero.

A query of the 'general' aspect asks for several values at once (every attribute its
caption names, or its class label): its hit for a training example is the share of those
values the example has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attribution_core.answers import UNIFORM
from attribution_core.statistics import bootstrap_ci
from attribution_core.weights.artifact import Choice
from attribution_core.weights.choice import candidates, choose, record


def _hit(value: Any, wanted: Any) -> float:
    """1 when a training example's value is the asked one; for tuples, the share of equal parts."""
    if isinstance(wanted, tuple):
        value = value if isinstance(value, tuple) else (None,) * len(wanted)
        return float(np.mean([v == w for v, w in zip(value, wanted)]))
    return float(value == wanted)


def validate(top: np.ndarray, names: list[str], asked: dict[str, Sequence[Any]],
             values: dict[str, dict[str, Any]], *, resamples: int = 1000, seed: int = 0) -> dict[str, Choice]:
    """Per aspect of ``asked``: the choice ``record`` (``answered_by``, ``by``, ``rule``,
    ``gains``) plus ``"recall": {candidate: Recall@k}``, ``"intervals": {candidate: [lo, hi]}``,
    ``"queries"`` and ``"k"``.

    ``top``: ``[Q, C, k]`` example ids (``""`` where a list is short) of each validation
    query under each weighting in ``names`` (learned aspects and ``'uniform'``); ``asked``:
    the value (or tuple of values) each query asks for; ``values``: every training example's
    value (or tuple) per aspect.
    """
    out: dict[str, Choice] = {}
    for aspect, wanted in asked.items():
        if len(wanted) != top.shape[0]:
            raise ValueError(f"{top.shape[0]} validation queries but {len(wanted)} {aspect} values")
        order = candidates(aspect, names)
        hits = {name: np.array([np.mean([_hit(values[aspect].get(i), wanted[q]) for i in top[q, names.index(name)] if i])
                                for q in range(len(wanted))]) for name in order}
        gains = {name: (float((hits[name] - hits[UNIFORM]).mean()),
                        *bootstrap_ci(hits[name] - hits[UNIFORM], resamples, seed=seed))
                 for name in order if name != UNIFORM}
        out[aspect] = {**record(choose(gains, order), "validation", gains), "queries": len(wanted),
                       "k": int(top.shape[2]), "recall": {name: round(float(h.mean()), 4) for name, h in hits.items()},
                       "intervals": {name: [round(v, 4) for v in bootstrap_ci(h, resamples, seed=seed)]
                                     for name, h in hits.items()}}
    return out
