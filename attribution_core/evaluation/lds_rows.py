"""The rows of the LDS table: one weighting's LDS, a paired difference, the served choice and
the noise ceiling, every interval resampling queries and subsets (``intervals``).

Inputs are subset predictions ``[Q, S]`` (``metrics.subset_predictions`` of a ``[Q, N]``
score matrix) and the retrained outputs ``actual [Q, S]``.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np

from attribution_core.answers import UNIFORM
from attribution_core.evaluation.headroom import headroom
from attribution_core.evaluation.intervals import TwoWayBootstrap, spearman_rows
from attribution_core.evaluation.metrics import subset_predictions
from attribution_core.weights.choice import RULE, choose


class LdsCell(TypedDict):
    """One weighting's LDS: the mean Spearman over queries, its two-way 95 % interval, and
    the per-query values."""

    lds: float
    ci: list[float]
    per_query: list[float]


class Scored(TypedDict):
    """A served row's LDS and its paired difference to uniform weights, with intervals."""

    lds: float
    ci: list[float]
    difference: float
    difference_ci: list[float]


class CrossFitted(Scored):
    choices: list[str]
    """The weighting each half of the queries chose (and the other half was served)."""


class ServedLds(Scored):
    """Which of uniform and learned weights LDS says to serve (``served_choice``)."""

    weighting: str
    by: str
    rule: str
    gain: list[float]
    """``[mean, lo, hi]`` of LDS(learned) - LDS(uniform)."""
    cross_fitted: CrossFitted


class _Ceiling(TypedDict):
    agreement: float
    ci: list[float]
    ceiling: float
    ceiling_of_mean: float
    per_query: list[float]


class NoiseCeiling(_Ceiling, total=False):
    """How far LDS can rise against one retraining seed's outputs (``noise_ceiling``), and
    (set by the evaluation) the second ground truth's seed and cache."""

    against_mean: dict[str, dict[str, Any]]
    replica_seed: int
    ground_truth: dict[str, Any]


class SettingSelection(TypedDict, total=False):
    """The featurize setting a shipped default would take (``select_setting``), or why none."""

    basis: str | None
    chosen: str | None
    why: str
    max_bytes_per_row: float
    first_half: dict[str, float]
    second_half: dict[str, float]


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def lds_cell(boot: TwoWayBootstrap, predicted: np.ndarray, actual: np.ndarray) -> LdsCell:
    """``{"lds", "ci", "per_query"}``: the mean Spearman over queries, its two-way interval."""
    per_query = spearman_rows(predicted, actual)
    return {"lds": _mean(per_query), "ci": boot.interval(predicted, actual), "per_query": per_query.tolist()}


def query_halves(queries: int, seed: int) -> np.ndarray:
    """``bool [Q]``: a seeded half of the queries (True) and the rest."""
    return np.random.default_rng(seed).permutation(queries) % 2 == 0


def served_choice(boot: TwoWayBootstrap, uniform: np.ndarray, learned: np.ndarray, actual: np.ndarray,
                  *, seed: int) -> ServedLds:
    """Which of uniform and learned weights LDS says to serve (``choice.RULE``: learned only
    when its paired interval against uniform lies above 0), with the served row's LDS and its
    paired difference to uniform, and the same rule cross-fitted: each half of the queries
    served by the choice the other half makes, the honest estimate of what the rule gains on
    queries it did not see (the full-data choice reads the queries it is scored on)."""
    gain = boot.paired(learned, uniform, actual)
    weighting = "learned" if choose({"general": gain}, ["general", UNIFORM]) == "general" else UNIFORM
    served = learned if weighting == "learned" else uniform
    half = query_halves(boot.queries, seed)
    crossed, picks = uniform.copy(), []
    for fit in (half, ~half):
        if fit.sum() < 1 or (~fit).sum() < 1:
            picks.append(UNIFORM)
            continue
        sub = TwoWayBootstrap(int(fit.sum()), boot.subsets, boot.resamples, boot.seed)
        pick = choose({"general": sub.paired(learned[fit], uniform[fit], actual[fit])}, ["general", UNIFORM])
        picks.append("learned" if pick == "general" else UNIFORM)
        if pick == "general":
            crossed[~fit] = learned[~fit]
    return ServedLds(weighting=weighting, by="lds", rule=RULE, gain=gain, **_scored(boot, served, uniform, actual),
                     cross_fitted=CrossFitted(choices=picks, **_scored(boot, crossed, uniform, actual)))


def _scored(boot: TwoWayBootstrap, served: np.ndarray, uniform: np.ndarray, actual: np.ndarray) -> Scored:
    cell = lds_cell(boot, served, actual)
    difference = boot.paired(served, uniform, actual)
    return {"lds": cell["lds"], "ci": cell["ci"], "difference": difference[0], "difference_ci": difference[1:]}


def noise_ceiling(boot: TwoWayBootstrap, actual: np.ndarray, replica: np.ndarray,
                  served: dict[str, np.ndarray] | None = None) -> NoiseCeiling:
    """How far LDS can rise against outputs measured with one retraining seed: ``agreement``
    is the LDS of a second ground truth (the same subsets retrained with other seeds) as if it
    were an attribution, with its two-way interval; with truth = signal + independent seed
    noise, no attribution correlates with one replica better than about the square root of
    that agreement (``ceiling``, per query, averaged). ``served``: predictions ``[Q, S]`` per
    basis, scored against the mean of both ground truths too (``against_mean``; its ceiling,
    ``sqrt(2 r / (1 + r))``, is ``ceiling_of_mean``): what the same answers score once half the
    seed noise is averaged away."""
    per_query = spearman_rows(replica, actual)
    agreement = np.clip(per_query, 0, None)
    out: NoiseCeiling = {"agreement": _mean(per_query), "ci": boot.interval(replica, actual),
                         "ceiling": _mean(np.sqrt(agreement)),
                         "ceiling_of_mean": _mean(np.sqrt(2 * agreement / (1 + agreement))),
                         "per_query": per_query.tolist()}
    if served:
        mean = (actual + replica) / 2
        out["against_mean"] = {b: {k: v for k, v in lds_cell(boot, p, mean).items() if k != "per_query"}
                               for b, p in served.items()}
    return out


def basis_row(pair: np.ndarray, masks: np.ndarray, actual: np.ndarray, boot: TwoWayBootstrap, *, seed: int,
              by_damping: dict[float, np.ndarray] | None = None, per_group: np.ndarray | None = None,
              learned: np.ndarray | None = None, groups: list[str] | None = None,
              headroom_resamples: int = 2000) -> tuple[dict[str, Any], dict[str, Any]]:
    """One basis's LDS table row and its per-query values.

    ``pair [2, Q, N]``: scores under uniform and learned weights; ``by_damping``: the same at
    each swept kernel damping; ``per_group [M, Q, N]``: scores under each group alone (for
    the headroom, fitted on halves); ``learned [M]``: the learned weights (named by ``groups``).
    The row: uniform and learned LDS with two-way intervals, their paired difference, the
    served choice (``served_choice``), the damping sweep and the headroom.
    """
    uniform, learned_pred = (subset_predictions(pair[i], masks) for i in (0, 1))
    row: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    for name, predicted in (("uniform", uniform), ("learned", learned_pred)):
        cell = lds_cell(boot, predicted, actual)
        row[name], row[f"{name}_ci"], detail[name] = cell["lds"], cell["ci"], cell["per_query"]
    difference = boot.paired(learned_pred, uniform, actual)
    row["difference"], row["difference_ci"] = difference[0], difference[1:]
    row["served"] = served_choice(boot, uniform, learned_pred, actual, seed=seed)
    if learned is not None and groups is not None:
        row["weights"] = dict(zip(groups, np.asarray(learned).tolist()))
    if by_damping:
        row["damping"] = []
        for d, scores in sorted(by_damping.items()):
            entry: dict[str, Any] = {"damping": d}
            for i, name in enumerate(("uniform", "learned")):
                cell = lds_cell(boot, subset_predictions(scores[i], masks), actual)
                entry[name], entry[f"{name}_ci"] = cell["lds"], cell["ci"]
            row["damping"].append(entry)
    if per_group is not None and learned is not None:
        m = per_group.shape[0]
        found = headroom(per_group, masks, actual, {"uniform": np.full(m, 1.0 / m), "learned": np.asarray(learned)},
                         seed=seed, resamples=headroom_resamples)
        scored = found["scored"]
        row["headroom"] = {"lds": found["headroom"]["lds"], "ci": found["headroom"]["ci"],
                           "uniform": scored["uniform"]["lds"], "uniform_ci": scored["uniform"]["ci"],
                           "learned": scored["learned"]["lds"], "learned_ci": scored["learned"]["ci"],
                           "weights": dict(zip(groups or [], np.mean(found["weights"], axis=0).tolist())),
                           "shrinkage": found["shrinkage"]}
        detail["headroom"] = {"headroom": found["headroom"]["per_query"],
                              **{name: scored[name]["per_query"] for name in ("uniform", "learned")}}
    return row, detail


def select_setting(settings: dict[str, dict[str, Any]], basis: str | None,
                   max_bytes_ratio: float = 2.0) -> SettingSelection:
    """The setting a shipped default would take: among those the index can serve (one
    checkpoint) within ``max_bytes_ratio`` of the default's bytes per row, the highest served
    LDS of the served index's ``basis`` on the first half of the queries; the second half
    confirms it (another benchmark's whole table confirms it again)."""
    if basis is None or any(basis not in row["bases"] for row in settings.values()):
        return {"basis": basis, "chosen": None, "why": "the served index's basis is not among evaluate.bases"}
    budget = max_bytes_ratio * settings["default"]["bytes_per_row"]
    eligible = {name: row for name, row in settings.items() if row["checkpoints"] == 1 and row["bytes_per_row"] <= budget}
    chosen = max(eligible, key=lambda name: eligible[name]["bases"][basis]["served_halves"][0])
    return {"basis": basis, "max_bytes_per_row": budget, "chosen": chosen,
            "first_half": {n: r["bases"][basis]["served_halves"][0] for n, r in eligible.items()},
            "second_half": {n: r["bases"][basis]["served_halves"][1] for n, r in eligible.items()}}


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded (for metrics.json)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value
