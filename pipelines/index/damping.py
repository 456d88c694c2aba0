"""The index job's kernel: Gram blocks, then the structure and damping chosen by the objective
(``index.kernel`` / ``index.damping_rule: objective``, see ``attribution_core.index.damping``):
generate and featurize the queries in one Ray task (on a GPU when the index actors use one),
then one Ray Data scan of the new shards."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, TypedDict

import numpy as np
import ray
import torch

from attribution_core.config import FeaturizeConfig, ProjectConfig, WeightsConfig, from_mapping, to_mapping
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.damping import candidate_objectives, candidate_queries, choose_candidate
from attribution_core.index.kernel import coarsest, kernel_candidates, sub_grams
from attribution_core.index.manifest import KernelChoice, KernelStats
from attribution_core.index.store import IndexStore
from pipelines.index.commit import gram_pass, write_stats
from pipelines.models import ModelRef
from pipelines.output import quiet_libraries
from pipelines.ray_runtime import cluster_cpus
from pipelines.weights.queries import learning_queries, prompts_for
from pipelines.weights.scan import scan

log = logging.getLogger(__name__)


class KernelSettings(TypedDict, total=False):
    """What a version's kernel depends on beyond its features (kept in its build record)."""

    kernel: str
    max_full_kernel_dim: int
    rule: str
    damping: float
    grid: list[float]
    queries: int
    query_settings: dict[str, Any]


def kernel_settings(cfg: ProjectConfig) -> KernelSettings:
    """What the kernel of a build depends on beyond the features: a version built under other
    settings is not up to date even when no example changed."""
    icfg, wcfg = cfg.index, cfg.weights
    out: KernelSettings = {"kernel": icfg.kernel, "max_full_kernel_dim": icfg.max_full_kernel_dim,
                           "rule": icfg.damping_rule}
    if icfg.damping_rule == "fixed":
        return {**out, "damping": icfg.damping}
    return {**out, "grid": sorted(icfg.damping_grid), "queries": icfg.damping_queries,
            "query_settings": {"seed": wcfg.seed, "top_k": wcfg.top_k, "guidance": wcfg.guidance,
                               "sample_steps": wcfg.sample_steps}}


def _featurized_queries(model: ModelRef, device: str, featurize: dict[str, Any], weights: dict[str, Any],
                        *, prompts: list[str | None]) -> np.ndarray:
    """``[n, k_total]`` query-side features of images the model generates (one per prompt)."""
    quiet_libraries()
    featurizer = Featurizer(model.load(device), from_mapping(FeaturizeConfig, featurize))
    features, _ = learning_queries(featurizer, "general", prompts, from_mapping(WeightsConfig, weights),
                                   stream="damping-queries")
    return features.numpy()


def choose_kernel(cfg: ProjectConfig, model: ModelRef, conditioning: str, device: str, *, store: IndexStore,
                          paths: list[str], layout: GroupLayout,
                          grams: dict[str, list[tuple[str, int, int, np.ndarray]]], partitions: int) -> KernelChoice:
    """``{"rule", "kernel", "damping", "objective": {kernel: {damping: value}}, "queries", "top_k"}``
    for the shards ``paths``: every kernel structure of ``grams`` at every damping the rule
    leaves open (``index.damping_grid``, or ``index.damping`` alone under 'fixed')."""
    icfg = cfg.index
    wcfg = dataclasses.replace(cfg.weights, queries_per_aspect=icfg.damping_queries)
    prompts = prompts_for("general", wcfg, store, paths, conditioning=conditioning,
                          stream="damping-prompts")
    task = ray.remote(_featurized_queries).options(num_cpus=1, num_gpus=1 if device == "cuda" else 0)
    queries = torch.from_numpy(np.array(ray.get(task.remote(model, device, to_mapping(cfg.featurize),
                                                            to_mapping(wcfg), prompts=prompts))))  # a writable copy
    dampings = sorted(icfg.damping_grid) if icfg.damping_rule == "objective" else [icfg.damping]
    candidates = [(kind, d) for kind in grams for d in dampings]
    blocks = {kind: [(offset, dim, gram) for _, offset, dim, gram in found] for kind, found in grams.items()}
    stacked = candidate_queries(queries, layout, blocks, candidates)
    source = {"kind": "index", "uri": store.uri, "layout": layout.to_manifest()}
    state = scan(source, paths, stacked, torch.ones(1, 1), r=cfg.weights.top_k, with_noise=True, partitions=partitions)
    objective = {c: round(v, 6) for c, v in candidate_objectives(state.scores[:, 0], state.noise, candidates).items()}
    kind, damping = choose_candidate(objective)
    log.info("kernel by the objective on %d generated queries %s -> %s at damping %g", len(prompts),
             {f"{k} {d:g}": v for (k, d), v in objective.items()}, kind, damping)
    table: dict[str, dict[str, float]] = {}
    for (k, d), v in objective.items():
        table.setdefault(k, {})[str(d)] = v
    return {"rule": icfg.damping_rule, "kernel": kind, "damping": damping, "objective": table,
            "queries": len(prompts), "top_k": cfg.weights.top_k}


def kernel_stats(cfg: ProjectConfig, model: ModelRef, conditioning: str, device: str, *, store: IndexStore,
                 version: str,
                 paths: list[str], layout: GroupLayout, lap: Callable[[str], None]) -> KernelStats:
    """The manifest's ``stats`` of a build over the shards ``paths``: one Gram pass at the
    coarsest candidate structure (the others' blocks are slices of it), the kernel chosen by
    the objective when the settings leave a choice, the chosen Gram and kernel written."""
    icfg = cfg.index
    kinds = kernel_candidates(icfg.kernel, layout.k_total, icfg.max_full_kernel_dim)
    partitions = icfg.stats_partitions or cluster_cpus()
    measured = gram_pass(store, paths, layout, coarsest(kinds), partitions=partitions)
    grams = {kind: sub_grams(measured, layout, kind) for kind in kinds}
    lap("stats")
    choice: KernelChoice = {"rule": "fixed", "kernel": kinds[0], "damping": icfg.damping}
    if (icfg.damping_rule == "objective" or len(kinds) > 1) and paths:
        choice = choose_kernel(cfg, model, conditioning, device, store=store, paths=paths, layout=layout, grams=grams,
                               partitions=partitions)
        lap("damping")
    stats = write_stats(store, version, grams[choice["kernel"]], choice["kernel"], damping=choice["damping"])
    stats["kernel_choice"] = choice
    return stats
