"""The featurizer's quality/cost frontier on the LDS universe (``evaluate.frontier``).

One setting of ``featurize`` changed at a time -- projection width per layer, timesteps,
noise draws -- and an ensemble of the universe model's checkpoints. Each setting gets its
own indexes (``<out>/lds/frontier/<setting>/index-<measurement>``, the kernel chosen by the
index rule as always), its own learned weights per basis, and is scored on the same queries
and ground truth as the main table: LDS of uniform weights and of the weighting LDS says to
serve, with two-way intervals; bytes per stored row; and featurize seconds per row, timed in
this process on the same universe examples for every setting.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, TypedDict

import numpy as np

from attribution_core.config import FeaturizeConfig
from attribution_core.config_evaluate import FrontierConfig
from attribution_core.data.loading import load_training_data
from attribution_core.evaluation.lds_rows import SettingSelection, basis_row, query_halves, select_setting
from attribution_core.evaluation.metrics import subset_predictions
from attribution_core.features.groups import build_layout
from attribution_core.index.kernel import LAYER_BLOCK
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import load_index
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.seeding import stable_seed
from pipelines.evaluation.choice import served_basis
from pipelines.evaluation.ensemble import checkpoint_members
from pipelines.evaluation.published import featurize_seconds_per_row, matching_basis
from pipelines.evaluation.scoring import Member, basis_scores
from pipelines.evaluation.universe import BASES, basis_config
from pipelines.index.job import IndexRequest, run_index
from pipelines.models import load_model_dir
from pipelines.steps import ensure_weights

log = logging.getLogger(__name__)

SELECTION = "frontier-selection"
"""Seed stream of the query halves: the first chooses settings, the second confirms them."""


def settings(base: FeaturizeConfig, fcfg: FrontierConfig) -> dict[str, FeaturizeConfig]:
    """``{name: featurize settings}``: the base ('default') and each single change of it."""
    out = {"default": base}
    for width in fcfg.projection:
        if (width, width) != (base.projection.k_in, base.projection.k_out):
            out[f"projection-{width}x{width}"] = dataclasses.replace(
                base, projection=dataclasses.replace(base.projection, k_in=width, k_out=width))
    for count in fcfg.timesteps:
        if count != base.timesteps.count:
            out[f"timesteps-{count}"] = dataclasses.replace(
                base, timesteps=dataclasses.replace(base.timesteps, count=count))
    for draws in fcfg.noise_draws:
        if draws != base.noise_draws:
            out[f"noise-draws-{draws}"] = dataclasses.replace(base, noise_draws=draws)
    return out


def _timing_batch(ctx, n: int) -> ExampleBatch:
    data = load_training_data(ctx.universe_uri, ctx.cfg.subset_train)
    n = min(n, len(data.example_ids))
    return ExampleBatch(tuple(data.example_ids[:n]), data.pixels[:n],
                        tuple(data.captions[:n]) if data.captions else None,
                        data.labels[:n] if data.labels is not None else None)


def _seconds_per_row(adapter: DiffusersAdapter, fcfg: FeaturizeConfig, batch: ExampleBatch) -> float:
    """Median of 3 of D-TRAK's featurize seconds per row under ``fcfg`` (the measurement
    changes nothing of the cost that matters here)."""
    return featurize_seconds_per_row(adapter, dataclasses.replace(fcfg, measurement="square"), batch, repeats=3)


def _members(ctx, setting: str, fcfg: FeaturizeConfig, *, finals: dict[str, Member],
             documents: dict[str, dict[str, Any]], adapter) -> tuple[dict[str, Member], dict[str, dict[str, Any]]]:
    """The final-model member of each measurement and the learned weights of each basis
    under ``fcfg`` (the main table's own for the default setting)."""
    if setting == "default":
        return finals, documents
    cfg = dataclasses.replace(ctx.cfg, featurize=fcfg)
    widest = max(g.dim for g in build_layout(adapter.tracked_model(), fcfg.groups, fcfg.projection).groups)
    if widest > ctx.cfg.evaluate.frontier.max_block_dim:  # a group's kernel block would not fit: one per layer
        cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, kernel=LAYER_BLOCK))
    members, docs = {}, {}
    for basis in ctx.cfg.evaluate.bases:
        measurement = BASES[basis].measurement
        bcfg = basis_config(cfg, basis, str(ctx.folder / "frontier" / setting / f"index-{measurement}"))
        if measurement not in members:
            built = run_index(bcfg, IndexRequest(dataset=ctx.universe_uri, model=ctx.model_dir, out=bcfg.index.out,
                                                 ray_address=ctx.ray_address))
            index = load_index(bcfg.index.out, version=built["version"])
            members[measurement] = Member(index, version_featurizer(adapter, index.manifest,
                                                                    fcfg.max_rows_per_pass).flat(ctx.batch))
        docs[basis], _ = ensure_weights(bcfg, bcfg.index.out, members[measurement].index.manifest.version,
                                        model=ctx.model_dir, ray_address=ctx.ray_address)
    return members, docs


def _row(ctx, members: list[Member], document: dict[str, Any], kernel: bool) -> tuple[dict[str, Any], np.ndarray]:
    """One basis under one setting: uniform, learned and served LDS with two-way intervals, and
    the served LDS on each half of the queries (``SELECTION``): settings are chosen on the
    first half, and the second half (and the other benchmark) confirms the choice. Also
    returns the served predictions ``[Q, S]`` (for the paired difference to the default)."""
    scored = basis_scores(members, document, kernel, ctx.order)
    row, detail = basis_row(scored.pair, ctx.masks, ctx.actual, ctx.boot,
                            seed=stable_seed("frontier", ctx.cfg.evaluate.seed))
    served = row["served"]
    learned = served["weighting"] == "learned"
    per_query = np.asarray(detail["learned" if learned else "uniform"], dtype=float)
    half = query_halves(len(per_query), stable_seed(SELECTION, ctx.cfg.evaluate.seed))
    return ({"uniform": row["uniform"], "uniform_ci": row["uniform_ci"], "served": served["weighting"],
             "served_lds": served["lds"], "served_ci": served["ci"], "learned": row["learned"],
             "learned_ci": row["learned_ci"], "difference": row["difference"], "difference_ci": row["difference_ci"],
             "served_halves": [float(np.nanmean(per_query[half])), float(np.nanmean(per_query[~half]))]},
            subset_predictions(scored.pair[1 if learned else 0], ctx.masks))


class SettingRow(TypedDict, total=False):
    """One featurize setting of the frontier: its settings, cost and every basis's row."""

    featurize: dict[str, Any]
    kernel: dict[str, dict[str, Any]]
    checkpoints: int
    k_total: int
    bytes_per_row: int
    featurize_s_per_row: float
    bases: dict[str, dict[str, Any]]


class Frontier(TypedDict):
    """``metrics.json``'s ``lds_frontier``: every setting's row, and the one a default would take."""

    settings: dict[str, SettingRow]
    selection: SettingSelection


def frontier_rows(ctx, finals: dict[str, Member], documents: dict[str, dict[str, Any]], *,
                  references: dict[str, np.ndarray] | None = None) -> Frontier:
    """Every setting of ``evaluate.frontier`` (``SettingRow``) and the selection among them
    (``select_setting``); each basis row also holds ``versus_default``, the paired
    difference of its served LDS to the default setting's, and ``versus_published``, the
    paired difference to each published reference row on the same output (``references``:
    their predictions by row key), so any setting -- a new default among them -- is compared
    with the published pipelines on the same queries, subsets and resamples."""
    ecfg = ctx.cfg.evaluate
    adapter = load_model_dir(ctx.model_dir)
    out: dict[str, SettingRow] = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    costs: dict[str, tuple[FeaturizeConfig, int]] = {}
    for setting, fcfg in settings(ctx.cfg.featurize, ecfg.frontier).items():
        log.info("frontier: %s", setting)
        members, docs = _members(ctx, setting, fcfg, finals=finals, documents=documents, adapter=adapter)
        out[setting], costs[setting] = _setting_row(fcfg, members, 1), (fcfg, 1)
        rows = {b: _row(ctx, [members[BASES[b].measurement]], docs[b], BASES[b].kernel) for b in ecfg.bases}
        out[setting]["bases"] = {b: r for b, (r, _) in rows.items()}
        predictions[setting] = {b: pred for b, (_, pred) in rows.items()}
    if ecfg.frontier.ensemble and ecfg.checkpoints > 1:
        setting = f"ensemble-{ecfg.checkpoints}"
        log.info("frontier: ensemble of %d checkpoints", ecfg.checkpoints)
        out[setting], costs[setting] = _setting_row(ctx.cfg.featurize, finals, ecfg.checkpoints), (ctx.cfg.featurize,
                                                                                                  ecfg.checkpoints)
        out[setting]["bases"], predictions[setting] = {}, {}
        for basis in ecfg.bases:
            spec = BASES[basis]
            bcfg = basis_config(ctx.cfg, basis, str(ctx.folder / f"index-{spec.measurement}"))
            members = checkpoint_members(bcfg, model_dir=ctx.model_dir, final=finals[spec.measurement],
                                         folder=ctx.folder, dataset=ctx.universe_uri, batch=ctx.batch,
                                         learning_rate_weighted=basis == "tracin", ray_address=ctx.ray_address)
            out[setting]["bases"][basis], predictions[setting][basis] = _row(ctx, members, documents[basis], spec.kernel)
    for setting, row in out.items():
        for basis, cell in row["bases"].items():
            cell["versus_default"] = ctx.boot.paired(predictions[setting][basis], predictions["default"][basis], ctx.actual)
            cell["versus_published"] = {key: ctx.boot.paired(predictions[setting][basis], predicted, ctx.actual)
                                        for key, predicted in (references or {}).items()
                                        if matching_basis(key) == basis}
    # Timed last, one after another, with nothing else running: the costs compare.
    timing = _timing_batch(ctx, ecfg.frontier.timing_examples)
    for setting, (fcfg, copies) in costs.items():
        out[setting]["featurize_s_per_row"] = copies * _seconds_per_row(adapter, fcfg, timing)
    return Frontier(settings=out, selection=select_setting(out, served_basis(ctx.cfg.featurize.measurement,
                                                                             ctx.cfg.weights.use_kernel)))


def _setting_row(fcfg: FeaturizeConfig, members: dict[str, Member], copies: int) -> SettingRow:
    """A setting's cost in bytes per stored row (float16 features), times ``copies``
    checkpoints, and the kernel each of its indexes chose; featurize seconds per row are
    added once every setting's indexes are built."""
    k_total = next(iter(members.values())).index.layout.k_total
    return {"featurize": {"projection": [fcfg.projection.k_in, fcfg.projection.k_out],
                          "timesteps": fcfg.timesteps.count, "noise_draws": fcfg.noise_draws},
            "kernel": {m: {k: x.index.manifest.stats[k] for k in ("kernel", "damping")} for m, x in members.items()},
            "checkpoints": copies, "k_total": k_total, "bytes_per_row": copies * 2 * k_total}
