"""Held-out learning queries and the shrinkage of each aspect's weights toward uniform.

Per aspect, ``weights.holdout_queries`` more learning queries are made exactly as the
learning ones (training captions for 'general', the aspect's template otherwise) with seeds
of their own; one Ray Data scan of the index gives, for every candidate ``(1 - a) uniform +
a w``, each query's top-k scores and moment matrix, from which the weight objective is
evaluated; ``attribution_core.weights.shrinkage`` picks the move.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from attribution_core.config import WeightsConfig
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.store import IndexStore
from attribution_core.weights.objective import group_queries
from attribution_core.index.scoring import heldout_objective
from attribution_core.weights.shrinkage import SHRINKAGE, choose_shrinkage, shrunk
from pipelines.weights.queries import learning_queries, prompts_for
from pipelines.weights.scan import scan

log = logging.getLogger(__name__)


def shrink_toward_uniform(featurizer: Featurizer, store: IndexStore, manifest: IndexManifest, layout: GroupLayout,
                          *, kernel: list[tuple[int, int, torch.Tensor]] | None, weights: dict[str, torch.Tensor],
                          cfg: WeightsConfig, source: dict[str, Any], paths: list[str],
                          partitions: int) -> dict[str, dict[str, Any]]:
    """Per aspect of ``weights`` (learned ``Tensor[M]``): ``{"a", "objective": {a: value},
    "queries"}``; empty when ``weights.holdout_queries`` is 0."""
    n = cfg.holdout_queries
    if n == 0:
        return {}
    held = dataclasses.replace(cfg, queries_per_aspect=n)
    conditioning = featurizer.adapter.conditioning
    aspects = list(weights)
    features = torch.cat([learning_queries(featurizer, a, prompts_for(a, held, store, manifest.shard_paths,
                                                                      conditioning=conditioning,
                                                                      stream="holdout-prompts"),
                                           held, stream="holdout-queries")[0] for a in aspects])
    candidates = torch.stack([shrunk(weights[a].float(), s) for a in aspects for s in SHRINKAGE])  # [A*S, M]
    state = scan(source, paths, group_queries(features, layout, kernel), candidates, r=cfg.top_k, with_noise=True,
                 partitions=partitions)
    out = {}
    for i, a in enumerate(aspects):
        rows = slice(i * n, (i + 1) * n)
        objective = {s: round(heldout_objective(state.scores[rows, i * len(SHRINKAGE) + j], state.noise[rows],
                                                candidates[i * len(SHRINKAGE) + j], cfg.lambda_w), 6)
                     for j, s in enumerate(SHRINKAGE)}
        out[a] = {"a": choose_shrinkage(objective), "objective": objective, "queries": n}
        log.info("%s: held-out objective by move from uniform %s -> %s", a, objective, out[a]["a"])
    return out
