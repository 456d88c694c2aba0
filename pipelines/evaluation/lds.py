"""LDS of the attribution bases, uniform vs learned weights (ARCHITECTURE §9, the D-TRAK protocol).

On the LDS universe (``universe.py``): an index per measurement (``<out>/lds/index-loss``,
``index-square``, ``index-das``) with learned 'general' weights per basis (artifacts
``tracin``, ``trak``, ``dtrak``, ``das``), TracIn-CP's checkpoint indexes when the universe
model keeps checkpoints; the ground truth (``groundtruth.py``, cached): the negative loss of
each subset model on each query; then per basis the LDS of uniform and learned weights, the
weighting LDS says to serve, the damping sweep and the headroom estimate, every interval
resampling queries and subsets. Optional parts: the noise ceiling (a second ground truth
from other training seeds), the published pipelines' reference rows (``published.py``) and
the featurizer's quality/cost frontier (``frontier.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.data.loading import TrainingData, load_training_data
from attribution_core.evaluation.intervals import TwoWayBootstrap
from attribution_core.evaluation.lds_rows import NoiseCeiling, basis_row, noise_ceiling
from attribution_core.evaluation.metrics import subset_masks, subset_predictions
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import load_index
from attribution_core.models.adapters import ExampleBatch
from attribution_core.seeding import stable_seed
from attribution_core.timing import Stopwatch
from pipelines.evaluation.ensemble import checkpoint_members
from pipelines.evaluation.frontier import Frontier, frontier_rows
from pipelines.evaluation.groundtruth import CachedRuns, GroundTruth, ground_truth
from pipelines.evaluation.published import reference_rows
from pipelines.evaluation.scoring import BasisScores, Member, basis_scores
from pipelines.evaluation.universe import (BASES, basis_config, basis_label, lds_queries, lds_recipe, output_config,
                                           split_universe, universe_model)
from pipelines.index.job import IndexRequest, run_index
from pipelines.models import load_model_dir
from pipelines.ray_runtime import cluster_gpus
from pipelines.steps import ensure_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LdsContext:
    """What every row of the LDS table is measured on (and the optional parts reuse)."""

    cfg: ProjectConfig
    folder: Path
    universe_uri: str
    model_dir: str
    batch: ExampleBatch  # the evaluation queries
    order: list[str]  # universe example ids, dataset order
    masks: np.ndarray  # [S, N]
    actual: np.ndarray  # [Q, S]
    boot: TwoWayBootstrap
    ray_address: str | None


def _served_predictions(row: dict[str, Any], scored: BasisScores, masks: np.ndarray) -> np.ndarray:
    """``[Q, S]`` predictions of the weighting the row says to serve."""
    return subset_predictions(scored.pair[1 if row["served"]["weighting"] == "learned" else 0], masks)


def _ground_truth(cfg: ProjectConfig, data: TrainingData, masks: np.ndarray, batch: ExampleBatch, *, folder: Path,
                  seed_offset: int = 0) -> GroundTruth:
    """Outputs of the models retrained on the subsets (``seed_offset``: with other training seeds)."""
    ecfg = cfg.evaluate
    recipe = dataclasses.replace(cfg.subset_train, seed=cfg.subset_train.seed + seed_offset)
    gpus = ecfg.gpus_per_task if ecfg.gpus_per_task >= 0 else (1.0 if cluster_gpus() else 0.0)
    return ground_truth(data, masks, recipe, batch, featurize=output_config(cfg), cache=folder, gpus_per_task=gpus)


def _bases(ctx: LdsContext, indexes: dict[str, dict[str, Any]], documents: dict[str, dict[str, Any]],
           finals: dict[str, Member]) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Every basis's row, per-query values, and the predictions it would serve."""
    ecfg = ctx.cfg.evaluate
    table, detail, served = {}, {}, {}
    for basis in ecfg.bases:
        spec = BASES[basis]
        members = [finals[spec.measurement]]
        if basis == "tracin" and ecfg.checkpoints > 1:  # TracIn-CP
            bcfg = basis_config(ctx.cfg, basis, indexes[spec.measurement]["uri"])
            members = checkpoint_members(bcfg, model_dir=ctx.model_dir, final=members[0], folder=ctx.folder,
                                         dataset=ctx.universe_uri, batch=ctx.batch, learning_rate_weighted=True,
                                         ray_address=ctx.ray_address)
        headroom = ecfg.headroom and ecfg.subsets >= 4 and len(ctx.batch) >= 4
        scored = basis_scores(members, documents[basis], spec.kernel, ctx.order, damping_grid=ecfg.damping_grid,
                              headroom=headroom)
        table[basis], detail[basis] = basis_row(
            scored.pair, ctx.masks, ctx.actual, ctx.boot, seed=stable_seed("lds-headroom", ecfg.seed),
            by_damping=scored.by_damping, per_group=scored.per_group, learned=scored.learned, groups=scored.groups,
            headroom_resamples=ecfg.bootstrap)
        table[basis]["label"] = basis_label(basis, ecfg.checkpoints)
        table[basis]["checkpoints"] = len(members)
        if scored.kernel_choice is not None:
            table[basis]["kernel_choice"] = scored.kernel_choice
        served[basis] = _served_predictions(table[basis], scored, ctx.masks)
    return table, detail, served


@dataclasses.dataclass
class LdsResult:
    """What ``run_lds`` measured, read by ``evaluate`` (``metrics.json``, ``lds_per_query.json``).

    ``table``: basis -> its LDS row (uniform, learned, their paired difference, the served
    weighting; ``lds_rows.basis_row``); ``per_query``: basis -> per-query values; ``queries``:
    each query's kind and prompt. ``noise_ceiling``, ``published`` and ``frontier`` are the
    optional rows (``evaluate.noise_ceiling``, ``.published``, ``.frontier``)."""

    table: dict[str, dict[str, Any]]
    per_query: dict[str, Any]
    queries: list[dict[str, Any]]
    n_subsets: int
    n_queries: int
    n_train: int
    universe_model: str
    trained_universe_model: bool
    indexes: dict[str, dict[str, str]]
    recipe: dict[str, Any]
    output: str
    ground_truth: CachedRuns
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    noise_ceiling: NoiseCeiling | None = None
    published: dict[str, Any] | None = None
    frontier: Frontier | None = None


def run_lds(cfg: ProjectConfig, ray_address: str | None = None) -> LdsResult:
    cfg = dataclasses.replace(cfg, subset_train=lds_recipe(cfg))
    ecfg = cfg.evaluate
    folder = Path(ecfg.out) / "lds"
    watch = Stopwatch(digits=1)
    lap = watch.lap
    universe = split_universe(cfg, folder)
    model_dir, trained = universe_model(cfg, universe, folder)
    lap("universe_model")

    indexes: dict[str, dict[str, Any]] = {}
    documents: dict[str, dict[str, Any]] = {}
    for basis in ecfg.bases:
        measurement = BASES[basis].measurement
        bcfg = basis_config(cfg, basis, str(folder / f"index-{measurement}"))
        if measurement not in indexes:
            built = run_index(bcfg, IndexRequest(dataset=universe.uri, model=model_dir, out=bcfg.index.out,
                                                 ray_address=ray_address))
            indexes[measurement] = {"uri": bcfg.index.out, "version": built["version"]}
            lap("index")
        documents[basis], _ = ensure_weights(bcfg, bcfg.index.out, indexes[measurement]["version"], model=model_dir,
                                             ray_address=ray_address)
        lap("weights")

    adapter = load_model_dir(model_dir)
    batch, kinds = lds_queries(cfg, adapter, model_dir, universe)
    finals = {}
    for measurement, where in indexes.items():
        index = load_index(where["uri"], version=where["version"])
        finals[measurement] = Member(index, version_featurizer(adapter, index.manifest,
                                                               cfg.featurize.max_rows_per_pass).flat(batch))
    lap("attribute")

    data = load_training_data(universe.uri, cfg.subset_train)
    order = [e.example_id for e in universe.examples]
    if data.example_ids != order:
        raise RuntimeError("the universe dataset does not read back in its written order")
    masks = subset_masks(len(order), ecfg.subsets, ecfg.subset_fraction, stable_seed("lds-subsets", ecfg.seed))
    truth = _ground_truth(cfg, data, masks, batch, folder=folder)
    lap("ground_truth")
    actual = -truth["outputs"]  # fit = -loss: an example that helps lowers the query's loss
    ctx = LdsContext(cfg=cfg, folder=folder, universe_uri=universe.uri, model_dir=model_dir, batch=batch, order=order,
                     masks=masks, actual=actual, boot=TwoWayBootstrap(len(batch), ecfg.subsets, ecfg.bootstrap, ecfg.seed),
                     ray_address=ray_address)
    table, detail, served = _bases(ctx, indexes, documents, finals)
    lap("lds")
    result = LdsResult(
        table=table, per_query=detail, queries=kinds, n_subsets=int(ecfg.subsets), n_queries=len(batch),
        n_train=len(order), universe_model=model_dir, trained_universe_model=trained is not None, indexes=indexes,
        recipe=to_mapping(cfg.subset_train),
        output=f"negative loss averaged over {ecfg.output_timesteps} timesteps x {ecfg.output_noise_draws} noise draws",
        ground_truth={k: truth[k] for k in ("key", "trained", "cached", "seconds", "folder")})
    if ecfg.noise_ceiling:
        replica = _ground_truth(cfg, data, masks, batch, folder=folder, seed_offset=1)
        result.noise_ceiling = {**noise_ceiling(ctx.boot, actual, -replica["outputs"], served),
                                   "replica_seed": cfg.subset_train.seed + 1,
                                   "ground_truth": {k: replica[k] for k in ("key", "trained", "cached", "folder")}}
        lap("noise_ceiling")
    references: dict[str, np.ndarray] = {}  # the published rows' predictions, for the frontier to pair with
    if ecfg.published is not None:
        result.published, references = reference_rows(ctx, adapter, data, served)
        lap("published")
    if ecfg.frontier is not None:
        result.frontier = frontier_rows(ctx, finals, documents, references=references)
        lap("frontier")
    result.stage_seconds = watch.seconds
    return result
