"""``attribution learn-weights``: per-group weights for each aspect, learned on an index version.

Rounds of: scan the index once for candidate pools and noise moments (Ray Data), optimise
theta on Ray Train, rescan under the learned weights and grow any pool that missed a true
top-k example; stop when every pool holds its query's top-k (or after ``max_rounds``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import tempfile
from typing import Any

import numpy as np
import torch

from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.opening import open_for_model, open_version
from attribution_core.index.reader import read_kernel
from attribution_core.index.store import IndexStore
from attribution_core.models.vocabulary import check_prompts
from attribution_core.timing import Stopwatch
from attribution_core.weights.artifact import artifact_path, weights_document
from attribution_core.weights.objective import group_queries, weights_from_theta
from attribution_core.weights.pools import (Pools, ScanState, extend_pools, mining_weightings, pools_from_state,
                                           stack_pools)
from attribution_core.weights.shrinkage import shrunk
from pipelines.models import load_model_dir
from pipelines.ray_runtime import cluster_cpus, ensure_ray
from pipelines.weights.holdout import shrink_toward_uniform
from pipelines.weights.queries import learning_queries, prompts_for, shown_shares
from pipelines.weights.scan import scan
from pipelines.weights.train import optimise
from pipelines.weights.validation import validate_aspects

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WeightsRequest:
    index: str
    version: str | None = None  # default: the index's latest
    model: str | None = None  # default: the model path recorded in the index manifest
    aspects: tuple[str, ...] | None = None  # default: weights.aspects of the config
    ray_address: str | None = None


def _select(state: ScanState, rows: slice, weighting: int) -> ScanState:
    return ScanState(state.scores[rows, weighting : weighting + 1], state.contrib[rows, weighting : weighting + 1],
                     state.ids[rows, weighting : weighting + 1], None)


def _queries(featurizer, manifest: dict[str, Any], aspects: list[str], prompts: dict[str, list[str | None]],
             wcfg) -> tuple[torch.Tensor, dict[str, float] | None]:
    """Features ``[Q, k_total]`` of every aspect's learning queries, and (``check_queries``)
    the share of each aspect's images that show the prompted value."""
    made = {a: learning_queries(featurizer, a, prompts[a], wcfg) for a in aspects}
    shown = (shown_shares(manifest["dataset"]["uri"], manifest["dataset"].get("caption_column"), featurizer.adapter,
                          {a: made[a][1] for a in aspects}, wcfg) if wcfg.check_queries else None)
    if shown:
        log.info("learning-query images showing the prompted attribute: %s", {a: round(v, 3) for a, v in shown.items()})
    return torch.cat([made[a][0] for a in aspects]), shown


def _shrink_and_validate(featurizer, store: IndexStore, manifest: dict[str, Any], layout: GroupLayout, kernel,
                         learned: dict[str, torch.Tensor], wcfg, source: dict[str, Any], paths: list[str],
                         partitions: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """How far each aspect's weights move from uniform (held-out learning queries), then which
    weighting answers each aspect (validation queries, text models only)."""
    shrinkage = shrink_toward_uniform(featurizer, store, manifest, layout, kernel, learned, wcfg, source, paths,
                                      partitions)
    moved = {a: shrunk(w, shrinkage[a]["a"]) if a in shrinkage else w for a, w in learned.items()}
    validation = (validate_aspects(featurizer, manifest, layout, kernel, moved, wcfg, source, paths, partitions)
                  if featurizer.adapter.conditioning == "text" else {})
    return shrinkage, validation


def _aspect_entry(aspect: str, learned: torch.Tensor, shrinkage: dict[str, Any] | None, theta: np.ndarray,
                  prompts: list[str | None], recall: list[float], shown: dict[str, float] | None,
                  validation: dict[str, dict[str, Any]], wcfg) -> dict[str, Any]:
    """The artifact's record of one aspect: its weights after the shrinkage toward uniform,
    the learned ones, and how they were chosen and checked."""
    weights = shrunk(learned, shrinkage["a"]) if shrinkage else learned
    return {"weights": weights.tolist(), "learned": learned.tolist(), "shrinkage": shrinkage, "theta": theta.tolist(),
            "queries": wcfg.queries_per_aspect, "prompts": sorted({p for p in prompts if p})[:20],
            "pool_recall": {"mean": float(np.mean(recall)), "min": float(min(recall))},
            "shown": (shown or {}).get(aspect), "answered_by": validation.get(aspect, {}).get("answered_by", aspect),
            "validation": validation.get(aspect)}


def learn_weights(cfg: ProjectConfig, req: WeightsRequest) -> dict[str, Any]:
    wcfg = cfg.weights
    watch = Stopwatch()
    lap = watch.lap
    store = IndexStore(req.index)
    manifest = open_version(store, req.version)  # refuses an empty version here, not in a Ray Train worker
    aspects = list(req.aspects or wcfg.aspects)
    if manifest["rows"] < wcfg.top_k:
        raise ConfigError(f"weights.top_k is {wcfg.top_k} but index version {manifest['version']} has only "
                          f"{manifest['rows']} rows; lower weights.top_k (and weights.pool_size) or index more examples")
    model_path = req.model or manifest["model"]["path"]
    adapter = load_model_dir(model_path)
    manifest, featurizer = open_for_model(store, manifest["version"], adapter, model_path,
                                          cfg.featurize.max_rows_per_pass)
    layout = GroupLayout.from_manifest(manifest["layout"])
    if adapter.conditioning != "text" and aspects != ["general"]:
        raise ConfigError(f"aspect weights need prompts; this model is {adapter.conditioning}-conditioned: "
                          "use --aspects general")
    lap("load")

    prompts = {a: prompts_for(a, wcfg, store, manifest, adapter.conditioning) for a in aspects}
    for a in aspects:  # before generating anything: a prompt the model cannot read teaches the weights noise
        check_prompts(prompts[a], adapter.vocabulary, f"weights.prompts.{a}" if a != "general" else "training captions")
    queries, shown = _queries(featurizer, manifest, aspects, prompts, wcfg)
    rows = {a: slice(i * wcfg.queries_per_aspect, (i + 1) * wcfg.queries_per_aspect) for i, a in enumerate(aspects)}
    kernel = read_kernel(store, manifest) if wcfg.use_kernel else None
    grouped = group_queries(queries, layout, kernel)  # [Q, M, k_total]
    lap("queries")

    ensure_ray(req.ray_address)
    source = {"kind": "index", "uri": store.uri, "layout": manifest["layout"]}
    paths = [s["path"] for s in manifest["shards"]]
    partitions = wcfg.scan_partitions or cluster_cpus()
    m = len(layout.groups)
    state = scan(source, paths, grouped, mining_weightings(m), wcfg.pool_size, True, partitions)
    pools = pools_from_state(state)
    noise = state.noise.numpy()
    lap("scan")

    theta = np.zeros((len(aspects), m))
    trajectory: list[dict[str, Any]] = []
    recall: dict[str, list[float]] = {}
    recall_by_round: list[dict[str, float]] = []  # min pool recall per aspect, each round
    storage = tempfile.mkdtemp(prefix="learn-weights-")
    for round_ in range(1, wcfg.max_rounds + 1):
        parts = [{"contrib": pools.contrib[rows[a]].numpy(), "valid": pools.valid[rows[a]].numpy(),
                  "noise": noise[rows[a]]} for a in aspects]
        result = optimise(parts, theta, wcfg.top_k, wcfg.lambda_w, wcfg.steps, wcfg.learning_rate, wcfg.workers,
                          wcfg.report_every, storage, f"round-{round_}")
        theta = result["theta"]
        trajectory += [{"round": round_, **t} for t in result["trajectory"]]
        lap("optimise")
        w = weights_from_theta(torch.from_numpy(theta)).float()  # [A, M]
        found = scan(source, paths, grouped, w, wcfg.top_k, False, partitions)
        grown = []
        for i, a in enumerate(aspects):
            extended, recall[a] = extend_pools(
                Pools(pools.ids[rows[a]], pools.contrib[rows[a]], pools.valid[rows[a]]), _select(found, rows[a], i))
            grown.append(extended)
        lap("rescan")
        recall_by_round.append({a: float(min(r)) for a, r in recall.items()})
        log.info("round %d: pool recall %s", round_, {a: round(float(np.mean(r)), 4) for a, r in recall.items()})
        if all(min(r) == 1.0 for r in recall.values()):
            break
        pools = stack_pools(grown)

    learned = dict(zip(aspects, weights_from_theta(torch.from_numpy(theta))))
    groups = [g.name for g in layout.groups]
    shrinkage, validation = _shrink_and_validate(featurizer, store, manifest, layout, kernel, learned, wcfg, source,
                                                 paths, partitions)
    lap("shrink_validate")
    per_aspect = {a: _aspect_entry(a, learned[a], shrinkage.get(a), theta[i], prompts[a], recall[a], shown,
                                   validation, wcfg)
                  for i, a in enumerate(aspects)}
    document = weights_document(store.uri, manifest, per_aspect, {
        "k": wcfg.top_k, "lambda_w": wcfg.lambda_w, "kernel": wcfg.use_kernel, "rounds": round_,
        "recall_by_round": recall_by_round, "pool_size": wcfg.pool_size, "query_seed": wcfg.seed, "trajectory": trajectory,
        "settings": to_mapping(wcfg), "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(watch.total(), 1), "stage_seconds": watch.seconds})
    path = artifact_path(manifest["version"], wcfg.name)
    store.write_json(path, document)
    lap("write")
    return {"index": store.uri, "version": manifest["version"], "artifact": f"{store.uri}/{path}", "rounds": round_,
            "recall_by_round": recall_by_round,
            "queries": len(queries), "aspects": {a: {"weights": dict(zip(groups, per_aspect[a]["weights"])),
                                                     "pool_recall": per_aspect[a]["pool_recall"],
                                                     "shown": per_aspect[a]["shown"],
                                                     "answered_by": per_aspect[a]["answered_by"],
                                                     "shrinkage": per_aspect[a]["shrinkage"],
                                                     "validation": per_aspect[a]["validation"]} for a in aspects},
            "objective": trajectory[-1]["objective"] if trajectory else None,
            "seconds": round(watch.total(), 1), "stage_seconds": watch.seconds}
