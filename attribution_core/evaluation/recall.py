"""Aspect Recall@K side by side (ARCHITECTURE §9): for queries with known attributes, the share of
their top-K training examples sharing each attribute, under the aspect's own weights, the
general weights, uniform weights, and pixel-space nearest neighbours."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from attribution_core.answers import UNIFORM
from attribution_core.evaluation.metrics import pixel_knn, recall_hits
from attribution_core.features.groups import GroupLayout
from attribution_core.index.scoring import attribute
from attribution_core.weights.artifact import weights_matrix

RECALL_COLUMNS = (("aspect", "aspect weights"), ("validated", "validated choice"), ("general", "general weights"),
                  ("uniform", "uniform weights"),
                  ("contrastive", "contrastive query"), ("contrastive_aspect", "contrastive + aspect weights"),
                  ("pixel_knn", "pixel kNN"))
"""Recall@K columns, in the order tables show them: (key, label). 'contrastive' scores the
Concept-TRAK query feature (the prompt against the prompt without the aspect) with uniform
weights, 'contrastive_aspect' the same feature with the aspect's learned weights. 'validated'
repeats the column of the weighting that ``learn-weights`` chose to answer the aspect with on
its validation queries (``answered_by``): what the endpoint answers."""


def aspect_recall_table(
    features: torch.Tensor,
    layout: GroupLayout,
    kernel: list[tuple[int, int, torch.Tensor]] | None,
    index_rows: torch.Tensor,
    *, weights: dict[str, Any] | None,
    query_attributes: dict[str, Sequence[Any]],
    train_attributes: dict[str, Sequence[Any]],
    k: int = 10,
    query_pixels: np.ndarray | None = None,
    train_pixels: np.ndarray | None = None,
    block: int = 4096,
    hits: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, dict[str, float]]:
    """``{aspect: {"aspect", "validated", "general", "uniform", "pixel_knn"}}`` Recall@k for every aspect
    present in both attribute tables. ``features [Q, D]`` are the queries', ``index_rows
    [N, D]`` the training set's; weightings without learned weights are left out. ``hits``,
    when given, receives the per-query values ``[Q]`` of every cell (for intervals)."""
    learned = set(weights["aspects"]) if weights else set()
    aspects = [a for a in query_attributes if a in train_attributes]
    names = sorted({a for a in aspects if a in learned} | ({"general"} & learned) | {UNIFORM})
    doc = weights or {"groups": list(layout.group_names), "aspects": {}}
    blocks = [index_rows[i : i + block] for i in range(0, index_rows.shape[0], block)]
    _, top = attribute(features, weights_matrix(doc, names), layout, kernel, blocks=blocks, k=k)  # [A, Q, k]
    knn = pixel_knn(query_pixels, train_pixels, k) if query_pixels is not None and train_pixels is not None else None
    table: dict[str, dict[str, float]] = {}
    for aspect in aspects:
        truth, asked = list(train_attributes[aspect]), list(query_attributes[aspect])
        per_query: dict[str, np.ndarray] = {}
        for label, name in (("aspect", aspect), ("general", "general"), ("uniform", UNIFORM)):
            if name in names:
                per_query[label] = recall_hits(top[names.index(name)].numpy(), asked, truth)
        chosen = (weights or {}).get("aspects", {}).get(aspect, {})
        if chosen.get("validation"):
            label = {aspect: "aspect", "general": "general", UNIFORM: "uniform"}[chosen["answered_by"]]
            per_query["validated"] = per_query[label]
        if knn is not None:
            per_query["pixel_knn"] = recall_hits(knn, asked, truth)
        table[aspect] = {label: float(np.mean(v)) for label, v in per_query.items()}
        if hits is not None:
            hits.setdefault(aspect, {}).update(per_query)
    return table


def contrastive_recall(features: torch.Tensor, layout: GroupLayout, kernel: list[tuple[int, int, torch.Tensor]] | None,
                       index_rows: torch.Tensor, *, weights: dict[str, Any] | None, aspect: str,
                       asked: Sequence[Any], truth: Sequence[Any], k: int = 10, block: int = 4096,
                       hits: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, float]:
    """Recall@k of one aspect's contrastive query features ``[Q, D]``: with uniform weights
    (``contrastive``) and, when learned, the aspect's weights (``contrastive_aspect``)."""
    learned = bool(weights) and aspect in weights["aspects"]
    names = [UNIFORM, aspect] if learned else [UNIFORM]
    doc = weights or {"groups": list(layout.group_names), "aspects": {}}
    blocks = [index_rows[i : i + block] for i in range(0, index_rows.shape[0], block)]
    _, top = attribute(features, weights_matrix(doc, names), layout, kernel, blocks=blocks, k=k)  # [A, Q, k]
    per_query = {"contrastive": recall_hits(top[0].numpy(), list(asked), list(truth))}
    if learned:
        per_query["contrastive_aspect"] = recall_hits(top[1].numpy(), list(asked), list(truth))
    if hits is not None:
        hits.setdefault(aspect, {}).update(per_query)
    return {name: float(np.mean(v)) for name, v in per_query.items()}
