"""The index job's damping choice (``index.damping_rule: objective``, see
``attribution_core.index.damping``): generate and featurize the damping queries in one Ray
task (on a GPU when the index actors use one), then one Ray Data scan of the new shards."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import ray
import torch

from attribution_core.config import FeaturizeConfig, ProjectConfig, WeightsConfig, from_mapping, to_mapping
from attribution_core.features.groups import GroupLayout
from attribution_core.index.damping import candidate_queries, choose_damping, damping_objectives
from attribution_core.index.store import IndexStore
from pipelines.weights.queries import prompts_for
from pipelines.weights.scan import scan

log = logging.getLogger(__name__)


def kernel_settings(cfg: ProjectConfig) -> dict[str, Any]:
    """What the kernel of a build depends on beyond the features: a version built under other
    settings is not up to date even when no example changed."""
    icfg, wcfg = cfg.index, cfg.weights
    out: dict[str, Any] = {"kernel": icfg.kernel, "max_full_kernel_dim": icfg.max_full_kernel_dim,
                           "rule": icfg.damping_rule}
    if icfg.damping_rule == "fixed":
        return {**out, "damping": icfg.damping}
    return {**out, "grid": sorted(icfg.damping_grid), "queries": icfg.damping_queries,
            "query_settings": {"seed": wcfg.seed, "top_k": wcfg.top_k, "guidance": wcfg.guidance,
                               "sample_steps": wcfg.sample_steps}}


def _featurized_queries(model: str, device: str, featurize: dict[str, Any], weights: dict[str, Any],
                        prompts: list[str | None]) -> np.ndarray:
    """``[n, k_total]`` query-side features of images the model generates (one per prompt)."""
    from attribution_core.features.featurize import Featurizer
    from pipelines.models import load_model_dir, quiet_libraries
    from pipelines.weights.queries import learning_queries

    quiet_libraries()
    featurizer = Featurizer(load_model_dir(model, device), from_mapping(FeaturizeConfig, featurize))
    features, _ = learning_queries(featurizer, "general", prompts, from_mapping(WeightsConfig, weights),
                                   stream="damping-queries")
    return features.numpy()


def choose_kernel_damping(cfg: ProjectConfig, model: str, conditioning: str, device: str, store: IndexStore,
                          paths: list[str], layout: GroupLayout, grams: list[tuple[str, int, int, np.ndarray]],
                          partitions: int) -> dict[str, Any]:
    """``{"rule", "damping", "objective": {damping: value}, "queries"}`` for the shards ``paths``."""
    icfg = cfg.index
    wcfg = dataclasses.replace(cfg.weights, queries_per_aspect=icfg.damping_queries)
    prompts = prompts_for("general", wcfg, store, {"shards": [{"path": p} for p in paths]}, conditioning,
                          stream="damping-prompts")
    task = ray.remote(_featurized_queries).options(num_cpus=1, num_gpus=1 if device == "cuda" else 0)
    queries = torch.from_numpy(np.array(ray.get(task.remote(model, device, to_mapping(cfg.featurize),
                                                            to_mapping(wcfg), prompts))))  # a writable copy
    grid = tuple(sorted(icfg.damping_grid))
    stacked = candidate_queries(queries, layout, [(offset, dim, gram) for _, offset, dim, gram in grams], grid)
    source = {"kind": "index", "uri": store.uri, "layout": layout.to_manifest()}
    state = scan(source, paths, stacked, torch.ones(1, 1), cfg.weights.top_k, True, partitions)
    objective = {d: round(v, 6) for d, v in damping_objectives(state.scores[:, 0], state.noise, grid).items()}
    chosen = choose_damping(objective)
    log.info("kernel damping by the objective on %d generated queries %s -> %g", len(prompts), objective, chosen)
    return {"rule": "objective", "damping": chosen, "objective": {str(d): v for d, v in objective.items()},
            "queries": len(prompts), "top_k": cfg.weights.top_k}
