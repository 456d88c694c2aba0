"""``attribution learn-weights``: per-group weights for each aspect, learned on an index version.

Rounds of: scan the index once for candidate pools and noise moments (Ray Data), optimise
theta on Ray Train, rescan under the learned weights and grow any pool that missed a true
top-k example; stop when every pool holds its query's top-k (or after ``max_rounds``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.config import ProjectConfig, WeightsConfig, to_mapping
from attribution_core.errors import ConfigError
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.kernel import Kernel
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.opening import open_for_model, open_version
from attribution_core.index.reader import read_kernel
from attribution_core.index.store import IndexStore
from attribution_core.models.vocabulary import check_prompts
from attribution_core.timing import Stopwatch
from attribution_core.weights.artifact import AspectWeights, Choice, artifact_path, weights_document
from attribution_core.weights.choice import served_choice
from attribution_core.weights.objective import group_queries, weights_from_theta
from attribution_core.weights.pools import Pools, ScanState, grow_pools, mining_weightings, pools_from_state
from attribution_core.weights.shrinkage import shrunk
from pipelines.models import load_model_dir
from pipelines.ray_runtime import alive_nodes, cluster_cpus, ensure_ray, require_shared_storage, retry_on_node_loss
from pipelines.weights.holdout import shrink_toward_uniform
from pipelines.weights.queries import learning_queries, prompts_for, shown_shares
from pipelines.weights.scan import scan
from pipelines.weights.train import AspectPools, TrainStorage, optimise
from pipelines.weights.validation import validate_aspects

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WeightsRequest:
    index: str
    version: str | None = None  # default: the index's latest
    model: str | None = None  # default: the model path recorded in the index manifest
    base: str | None = None  # the base of a LoRA model (default: the one recorded in the manifest)
    aspects: tuple[str, ...] | None = None  # default: weights.aspects of the config
    ray_address: str | None = None


def _queries(featurizer: Featurizer, manifest: IndexManifest, aspects: list[str], *,
             prompts: dict[str, list[str | None]], wcfg: WeightsConfig) -> tuple[torch.Tensor, dict[str, float] | None]:
    """Features ``[Q, k_total]`` of every aspect's learning queries, and (``check_queries``)
    the share of each aspect's images that show the prompted value."""
    made = {a: learning_queries(featurizer, a, prompts[a], wcfg) for a in aspects}
    shown = (shown_shares(manifest.dataset, featurizer.adapter,
                          {a: made[a][1] for a in aspects}, wcfg) if wcfg.check_queries else None)
    if shown:
        log.info("learning-query images showing the prompted attribute: %s", {a: round(v, 3) for a, v in shown.items()})
    return torch.cat([made[a][0] for a in aspects]), shown


def _shrink_and_validate(featurizer: Featurizer, store: IndexStore, manifest: IndexManifest, layout: GroupLayout, *,
                         kernel: Kernel, learned: dict[str, torch.Tensor], wcfg: WeightsConfig, source: dict[str, Any], paths: list[str],
                         partitions: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """How far each aspect's weights move from uniform (held-out learning queries), then which
    weighting answers each aspect (validation queries where the data says what they ask for)."""
    shrinkage = shrink_toward_uniform(featurizer, store, manifest, layout, kernel=kernel, weights=learned, cfg=wcfg,
                                      source=source, paths=paths,
                                      partitions=partitions)
    moved = {a: shrunk(w, shrinkage[a]["a"]) if a in shrinkage else w for a, w in learned.items()}
    validation = validate_aspects(featurizer, manifest, layout, kernel, weights=moved, cfg=wcfg, source=source,
                                  paths=paths, partitions=partitions)
    return shrinkage, validation


def _aspect_entry(aspect: str, learned: torch.Tensor, shrinkage: dict[str, Any] | None, theta: np.ndarray,
                  *, prompts: list[str | None], recall: list[float], shown: dict[str, float] | None,
                  validation: dict[str, Choice], wcfg: WeightsConfig) -> AspectWeights:
    """The artifact's record of one aspect: its weights after the shrinkage toward uniform,
    the learned ones, and how they were chosen and checked."""
    weights = shrunk(learned, shrinkage["a"]) if shrinkage else learned
    return AspectWeights(weights=weights.tolist(), learned=learned.tolist(), shrinkage=shrinkage, theta=theta.tolist(),
                         queries=wcfg.queries_per_aspect, prompts=sorted({p for p in prompts if p})[:20],
                         pool_recall={"mean": float(np.mean(recall)), "min": float(min(recall))},
                         shown=(shown or {}).get(aspect), **served_choice(aspect, validation.get(aspect)),
                         validation=validation.get(aspect))


@dataclasses.dataclass
class _Learned:
    """The optimisation's outcome: theta ``[A, M]``, the objective's trajectory, each
    aspect's last pool recall per query, and the lowest pool recall per aspect each round."""

    theta: np.ndarray
    rounds: int = 0
    trajectory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    recall: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    recall_by_round: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _optimise_rounds(wcfg: WeightsConfig, rows: dict[str, slice], pools: Pools, noise: np.ndarray, *,
                     rescan: Callable[[torch.Tensor], ScanState], watch: Stopwatch,
                     storage: TrainStorage) -> _Learned:
    """Rounds of: optimise theta on the pools (Ray Train), rescan under the learned weights
    (``rescan(weights [A, M])``), grow every pool that missed a true top-k example; until
    every pool holds its query's top-k or ``weights.max_rounds``."""
    out = _Learned(np.zeros((len(rows), pools.contrib.shape[2])))
    try:
        for round_ in range(1, wcfg.max_rounds + 1):
            out.rounds = round_
            parts = [AspectPools(contrib=pools.contrib[r].numpy(), valid=pools.valid[r].numpy(), noise=noise[r])
                     for r in rows.values()]
            result = optimise(parts, out.theta, wcfg, storage, name=f"round-{out.rounds}")
            out.theta = result.theta
            out.trajectory += [{"round": out.rounds, **t} for t in result.trajectory]
            watch.lap("optimise")
            pools, out.recall = grow_pools(pools, rescan(weights_from_theta(torch.from_numpy(out.theta)).float()), rows)
            watch.lap("rescan")
            out.recall_by_round.append({a: float(min(r)) for a, r in out.recall.items()})
            log.info("round %d: pool recall %s", out.rounds,
                     {a: round(float(np.mean(r)), 4) for a, r in out.recall.items()})
            if all(min(r) == 1.0 for r in out.recall.values()):
                break
    finally:
        storage.remove()
    return out


class WeightsSummary(TypedDict):
    """What ``learn_weights`` returns and ``attribution learn-weights --json`` prints: the
    artifact written, the rounds and pool recall of the optimisation, each aspect's weights
    by group with how they were chosen, the final objective and the stage seconds."""

    index: str
    version: str
    artifact: str
    rounds: int
    recall_by_round: list[dict[str, float]]
    queries: int
    aspects: dict[str, dict[str, Any]]
    objective: float | None
    seconds: float
    stage_seconds: dict[str, float]


def learn_weights(cfg: ProjectConfig, req: WeightsRequest) -> WeightsSummary:
    """Learn and write the weights artifact of ``req``; run again when a node of the cluster
    dies under a stage that cannot resume by itself (``cluster.node_loss_retries``; Ray Train
    resumes theta from its checkpoint within a run)."""
    return retry_on_node_loss(lambda: _learn_weights(cfg, req), what="learn-weights",
                              retries=cfg.cluster.node_loss_retries)


def _learn_weights(cfg: ProjectConfig, req: WeightsRequest) -> WeightsSummary:
    wcfg = cfg.weights
    watch = Stopwatch()
    store = IndexStore(req.index)
    manifest = open_version(store, req.version)  # refuses an empty version here, not in a Ray Train worker
    aspects = list(req.aspects or wcfg.aspects)
    if manifest.rows < wcfg.top_k:
        raise ConfigError(f"weights.top_k is {wcfg.top_k} but index version {manifest.version} has only "
                          f"{manifest.rows} rows; lower weights.top_k (and weights.pool_size) or index more examples")
    model_path = req.model or manifest.model.path
    adapter = load_model_dir(model_path, base=req.base or manifest.model.base)
    manifest, featurizer = open_for_model(store, manifest.version, adapter, model_path,
                                          max_rows_per_pass=cfg.featurize.max_rows_per_pass)
    layout = manifest.group_layout
    if adapter.conditioning != "text" and aspects != ["general"]:
        raise ConfigError(f"aspect weights need prompts; this model is {adapter.conditioning}-conditioned: "
                          "use --aspects general")
    watch.lap("load")

    prompts = {a: prompts_for(a, wcfg, store, manifest.shard_paths, conditioning=adapter.conditioning) for a in aspects}
    for a in aspects:  # before generating anything: a prompt the model cannot read teaches the weights noise
        check_prompts(prompts[a], adapter.vocabulary, f"weights.prompts.{a}" if a != "general" else "training captions")
    queries, shown = _queries(featurizer, manifest, aspects, prompts=prompts, wcfg=wcfg)
    rows = {a: slice(i * wcfg.queries_per_aspect, (i + 1) * wcfg.queries_per_aspect) for i, a in enumerate(aspects)}
    kernel = read_kernel(store, manifest.stats["blocks"]) if wcfg.use_kernel else None
    grouped = group_queries(queries, layout, kernel)  # [Q, M, k_total]
    watch.lap("queries")

    ensure_ray(req.ray_address)
    require_shared_storage(cfg.cluster, index__out=req.index)
    source = {"kind": "index", "uri": store.uri, "layout": manifest.layout}
    paths = [s.path for s in manifest.shards]
    partitions = wcfg.scan_partitions or cluster_cpus()
    state = scan(source, paths, grouped, mining_weightings(len(layout.groups)), r=wcfg.pool_size, with_noise=True,
                 partitions=partitions)
    watch.lap("scan")
    storage = TrainStorage.open(store.uri, shared=alive_nodes() > 1)
    result = _optimise_rounds(wcfg, rows, pools_from_state(state), state.noise.numpy(),
                              rescan=lambda w: scan(source, paths, grouped, w, r=wcfg.top_k, with_noise=False,
                                                    partitions=partitions), watch=watch, storage=storage)

    learned = dict(zip(aspects, weights_from_theta(torch.from_numpy(result.theta))))
    shrinkage, validation = _shrink_and_validate(featurizer, store, manifest, layout, kernel=kernel, learned=learned,
                                                 wcfg=wcfg, source=source,
                                                 paths=paths, partitions=partitions)
    watch.lap("shrink_validate")
    per_aspect = {a: _aspect_entry(a, learned[a], shrinkage.get(a), result.theta[i], prompts=prompts[a],
                                   recall=result.recall[a],
                                   shown=shown, validation=validation, wcfg=wcfg)
                  for i, a in enumerate(aspects)}
    document = weights_document(store.uri, manifest, per_aspect, {
        "k": wcfg.top_k, "lambda_w": wcfg.lambda_w, "kernel": wcfg.use_kernel, "rounds": result.rounds,
        "recall_by_round": result.recall_by_round, "pool_size": wcfg.pool_size, "query_seed": wcfg.seed,
        "trajectory": result.trajectory, "settings": to_mapping(wcfg),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(watch.total(), 1), "stage_seconds": watch.seconds})
    path = artifact_path(manifest.version, wcfg.name)
    store.write_json(path, document)
    watch.lap("write")
    groups = [g.name for g in layout.groups]
    return {"index": store.uri, "version": manifest.version, "artifact": f"{store.uri}/{path}",
            "rounds": result.rounds, "recall_by_round": result.recall_by_round, "queries": len(queries),
            "aspects": {a: {"weights": dict(zip(groups, entry["weights"])),
                            **{k: entry[k] for k in ("pool_recall", "shown", "answered_by", "choice", "shrinkage",
                                                       "validation")}}
                        for a, entry in per_aspect.items()},
            "objective": result.trajectory[-1]["objective"] if result.trajectory else None,
            "seconds": round(watch.total(), 1), "stage_seconds": watch.seconds}
