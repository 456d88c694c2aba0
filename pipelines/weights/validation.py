"""Validation queries for the learned weights, and the weighting each aspect is answered with.

Where the dataset says what a query asks for -- a column for an aspect (its subject, style
or background), the attribute columns together for 'general', or the class label of a
class-conditional model -- ``learn-weights`` draws training captions (or classes) and
samples images from them with seeds kept apart from the learning and the evaluation
queries, finds each query's top-k under every candidate weighting in one scan of the index,
and lets ``attribution_core.weights.validation`` choose by the rule of
``attribution_core.weights.choice``; the choice is recorded in the weights artifact as
``answered_by`` (with its evidence in ``choice``), and the endpoint answers the aspect with
it (and says so in ``substituted``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from attribution_core.answers import UNIFORM
from attribution_core.config import WeightsConfig
from attribution_core.data.readers import dataset_read_options, label_text, read_examples
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.manifest import IndexManifest
from attribution_core.models.sampling import generate
from attribution_core.seeding import stable_seed
from attribution_core.weights.objective import group_queries
from attribution_core.weights.validation import validate
from pipelines.weights.queries import featurize_generated
from pipelines.weights.scan import scan

log = logging.getLogger(__name__)


def validation_set(dataset: dict[str, Any], *, caption_column: str | None, label_column: str | None, aspects: list[str],
                   columns: list[str], n: int, seed: int,
                   label_names: list[str] | None = None
                   ) -> tuple[list[Any], dict[str, list[Any]], dict[str, dict[str, Any]]] | None:
    """What ``n`` validation queries ask for: ``(conditions, asked, values)``.

    Text models (``label_names`` None): ``n`` training captions drawn with the validation seed
    are the conditions; each aspect of ``aspects`` with a dataset column asks for its value, and
    'general' (when in ``aspects``) for the tuple of every attribute in ``columns`` the dataset
    has. Class models: the class indices, cycled, and 'general' asks for the class label.
    ``values``: every training example's value (or tuple) per aspect. None when nothing can be
    validated (no caption, no column)."""
    rows = list(read_examples(dataset["uri"], caption_column, **dataset_read_options(dataset)))
    if not rows:
        return None
    if label_names is not None:  # a class model: general asks for the generated class
        if "general" not in aspects or not label_column:
            return None
        conditions = [i % len(label_names) for i in range(n)]
        values = {"general": {e.example_id: label_text(e.attributes.get(label_column)) for e in rows}}
        return conditions, {"general": [label_names[c] for c in conditions]}, values
    present = [c for c in columns if all(e.attributes.get(c) is not None for e in rows)]
    validated = [a for a in aspects if (a == "general" and present) or (a != "general" and a in present)]
    captioned = [e for e in rows if e.caption]
    if not validated or not captioned:
        return None
    rng = random.Random(stable_seed("validation-prompts", seed))
    chosen = [rng.choice(captioned) for _ in range(n)]

    def value(e, aspect: str) -> Any:
        return tuple(e.attributes[c] for c in present) if aspect == "general" else e.attributes[aspect]

    return ([e.caption for e in chosen], {a: [value(e, a) for e in chosen] for a in validated},
            {a: {e.example_id: value(e, a) for e in rows} for a in validated})


def validate_aspects(featurizer: Featurizer, manifest: IndexManifest, layout: GroupLayout,
                     kernel: list[tuple[int, int, torch.Tensor]] | None, *, weights: dict[str, torch.Tensor],
                     cfg: WeightsConfig, source: dict[str, Any], paths: list[str],
                     partitions: int) -> dict[str, dict[str, Any]]:
    """Per validated aspect: the choice (``answered_by``, ``by``, ``rule``, ``gains``) with
    ``"recall": {candidate: Recall@k}``, ``"intervals": {candidate: [lo, hi]}``, ``"queries"``,
    ``"k"``. ``weights``: the learned ``Tensor[M]`` of each aspect (general included when learned).
    Aspects the data cannot validate are left out (``choice.unvalidated`` answers them)."""
    adapter = featurizer.adapter
    if cfg.validation_queries == 0 or not weights or adapter.conditioning == "none":
        return {}
    dataset = manifest.dataset
    found = validation_set(dataset, caption_column=dataset.get("caption_column"),
                           label_column=dataset.get("label_column"), aspects=list(weights), columns=list(cfg.prompts),
                           n=cfg.validation_queries, seed=cfg.seed,
                           label_names=adapter.label_names if adapter.conditioning == "class" else None)
    if found is None:
        log.info("no validation of the learned weights: the dataset has no caption and attribute column (or class "
                 "label) that says what a query asks for")
        return {}
    conditions, asked, values = found
    text = adapter.conditioning == "text"
    images = generate(adapter, prompts=conditions if text else None, labels=None if text else conditions,
                      n=len(conditions), seed=stable_seed("validation-queries", cfg.seed), guidance=cfg.guidance,
                      steps=cfg.sample_steps)
    grouped = group_queries(featurize_generated(featurizer, images), layout, kernel)
    names = sorted(weights) + [UNIFORM]
    m = len(layout.groups)
    matrix = torch.stack([weights[name].float() if name != UNIFORM else torch.full((m,), 1.0 / m) for name in names])
    top = scan(source, paths, grouped, matrix, r=cfg.top_k, with_noise=False,
               partitions=partitions).ids  # [Q, C, k] example ids
    out = validate(top, names, asked, values, seed=cfg.seed)
    for a, found in out.items():
        log.info("%(aspect)s validation Recall@%(k)d over %(queries)d queries: %(recall)s -> answered by %(by)s",
                 {"aspect": a, "k": cfg.top_k, "queries": len(conditions), "recall": found["recall"],
                  "by": found["answered_by"]})
    return out
