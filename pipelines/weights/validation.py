"""Validation queries for the aspect weights, and the weighting each aspect is answered with.

Where the dataset has a column for an aspect (its subject, style or background),
``learn-weights`` draws training captions and samples images from them with seeds kept
apart from the learning and the evaluation queries, finds each query's top-k under every
candidate weighting in one scan of the index, and lets ``attribution_core.weights.validation``
choose; the choice is recorded in the weights artifact as ``answered_by``, and the endpoint
answers the aspect with it (and says so in ``substituted``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from attribution_core.config import WeightsConfig
from attribution_core.data.readers import read_examples
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.features.seeding import stable_seed
from attribution_core.models.sampling import generate
from attribution_core.weights.artifact import UNIFORM
from attribution_core.weights.objective import group_queries
from attribution_core.weights.validation import validate
from pipelines.weights.queries import featurize_generated
from pipelines.weights.scan import scan

log = logging.getLogger(__name__)


def validation_set(dataset_uri: str, caption_column: str | None, aspects: list[str], n: int,
                   seed: int) -> tuple[list[str], dict[str, list[Any]], dict[str, dict[str, Any]]] | None:
    """``n`` training captions drawn with the validation seed, the attribute values each one
    asks for, and every example's values (``{aspect: {example_id: value}}``); None when the
    dataset has no column for ``aspects`` or no captions."""
    rows = list(read_examples(dataset_uri, caption_column))
    if not rows or not aspects or any(e.attributes.get(a) is None for e in rows for a in aspects):
        return None
    captioned = [e for e in rows if e.caption]
    if not captioned:
        return None
    rng = random.Random(stable_seed("validation-prompts", seed))
    chosen = [rng.choice(captioned) for _ in range(n)]
    return ([e.caption for e in chosen], {a: [e.attributes[a] for e in chosen] for a in aspects},
            {a: {e.example_id: e.attributes[a] for e in rows} for a in aspects})


def validate_aspects(featurizer: Featurizer, manifest: dict[str, Any], layout: GroupLayout,
                     kernel: list[tuple[int, int, torch.Tensor]] | None, weights: dict[str, torch.Tensor],
                     cfg: WeightsConfig, source: dict[str, Any], paths: list[str],
                     partitions: int) -> dict[str, dict[str, Any]]:
    """Per aspect with a dataset column: ``{"answered_by", "recall": {candidate: Recall@k},
    "intervals": {candidate: [lo, hi]}, "queries", "k"}``. ``weights``: the learned
    ``Tensor[M]`` of each aspect (general included when learned)."""
    aspects = [a for a in weights if a != "general"]
    if cfg.validation_queries == 0 or not aspects:
        return {}
    dataset = manifest["dataset"]
    found = validation_set(dataset["uri"], dataset.get("caption_column"), aspects, cfg.validation_queries, cfg.seed)
    if found is None:
        log.info("no validation of the aspect weights: the dataset has no caption and column for each of %s", aspects)
        return {}
    prompts, asked, values = found
    images = generate(featurizer.adapter, prompts=prompts, n=len(prompts),
                      seed=stable_seed("validation-queries", cfg.seed), guidance=cfg.guidance, steps=cfg.sample_steps)
    grouped = group_queries(featurize_generated(featurizer, images), layout, kernel)
    names = sorted(weights) + [UNIFORM]
    m = len(layout.groups)
    matrix = torch.stack([weights[name].float() if name != UNIFORM else torch.full((m,), 1.0 / m) for name in names])
    top = scan(source, paths, grouped, matrix, cfg.top_k, False, partitions).ids  # [Q, C, k] example ids
    out = validate(top, names, asked, values, seed=cfg.seed)
    for a, found in out.items():
        log.info("%s validation Recall@%d over %d queries: %s -> answered by %s", a, cfg.top_k, len(prompts),
                 found["recall"], found["answered_by"])
    return out
