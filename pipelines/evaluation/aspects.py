"""Aspect Recall@K on the main index and the report's gallery.

Queries are images the attributed model generates from training captions; each query's
known attributes are those of the example whose caption prompted it. For every attribute
column of the dataset that is an aspect (subject, style, background), Recall@K is the share
of the query's top-K training examples with the query's value: under the aspect's learned
weights, the general weights, uniform weights, and pixel-space nearest neighbours.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

import numpy as np

from attribution_core.answers import UNIFORM
from attribution_core.config import ProjectConfig
from attribution_core.config_stages import ASPECTS
from attribution_core.data.captions import without_concept
from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.readers import dataset_read_options, read_examples
from attribution_core.data.synthetic import BACKGROUNDS, STYLES, SUBJECTS, caption_for, is_held_out
from attribution_core.data.writers import read_marker
from attribution_core.errors import InputError
from attribution_core.evaluation.metrics import recall_intervals
from attribution_core.evaluation.recall import aspect_recall_table, contrastive_recall
from attribution_core.features.featurize import Featurizer
from attribution_core.index.kernel import Kernel
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import LoadedIndex
from attribution_core.index.scoring import attribute
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.sampling import generate
from attribution_core.seeding import stable_seed
from attribution_core.weights.artifact import weights_matrix
from pipelines.models import manifest_model
from pipelines.weights.queries import featurize_generated

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecallResult:
    """Recall@K of generated queries of known attributes (``metrics.json``'s
    ``recall_at_<k>`` and its intervals), on prompts the training set had (``table``) and on
    held-out attribute combinations (``heldout_table``), with the report's gallery;
    ``skipped`` says why nothing was measured."""

    table: dict[str, dict[str, float]]
    """Aspect -> column (aspect / general / uniform weights, contrastive, pixel kNN) -> Recall@K."""
    gallery: list[dict[str, Any]]
    skipped: str | None = None
    intervals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    heldout_table: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    heldout_intervals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    heldout_queries: int = 0
    aspects: list[str] = dataclasses.field(default_factory=list)
    queries: int = 0
    k: int = 0
    weights: list[str] = dataclasses.field(default_factory=list)
    """The aspects with learned weights."""


def run_recall(cfg: ProjectConfig, index: LoadedIndex, document: dict[str, Any] | None) -> RecallResult:
    """Recall@K of every aspect the dataset has a column for; ``skipped`` says why when the
    model or the dataset cannot give queries of known attributes."""
    ecfg = cfg.evaluate
    manifest = index.manifest
    adapter = manifest_model(manifest)
    if adapter.conditioning != "text":
        return RecallResult(table={}, gallery=[], skipped=f"the model is {adapter.conditioning}-conditioned; "
                            "queries of known attributes are prompted with captions")
    dataset = manifest.dataset
    raw = {e.example_id: e for e in read_examples(dataset["uri"], dataset.get("caption_column"),
                                                  **dataset_read_options(dataset))}
    rows = [raw[eid] for eid in index.example_ids]
    aspects = [a for a in ASPECTS if a != "general" and all(e.attributes.get(a) is not None for e in rows)]
    if not aspects or ecfg.recall_queries == 0:
        return RecallResult(table={}, gallery=[], skipped="the dataset has no subject, style or background column"
                            if not aspects else "evaluate.recall_queries is 0")
    rng = random.Random(stable_seed("recall-query-prompts", ecfg.seed))
    sources = [rng.choice([e for e in rows if e.caption]) for _ in range(ecfg.recall_queries)]
    featurizer = version_featurizer(adapter, manifest, cfg.featurize.max_rows_per_pass)
    kernel = index.kernel if cfg.weights.use_kernel else None
    channels, size = adapter.image_shape[0], adapter.image_shape[1]
    train_pixels = np.stack([decode_image(e.image, e.example_id, size, channels) for e in rows])
    train_attrs = {a: [e.attributes[a] for e in rows] for a in aspects}
    vocabulary = {a: list(cfg.weights.prompts[a].values) for a in aspects if a in cfg.weights.prompts}
    seen = QuerySet([e.caption for e in sources], {a: [e.attributes[a] for e in sources] for a in aspects}, "recall")
    table, intervals, generated, features, contrasts = _recall(cfg, adapter, featurizer, index, kernel=kernel,
                                                               document=document, queries=seen,
                                                    train_attrs=train_attrs, train_pixels=train_pixels, vocabulary=vocabulary)
    unseen = heldout_queries(manifest.dataset["uri"], aspects, ecfg.recall_queries, ecfg.seed)
    heldout_table, heldout_intervals = (_recall(cfg, adapter, featurizer, index, kernel=kernel, document=document,
                                                queries=unseen, train_attrs=train_attrs,
                                                train_pixels=train_pixels, vocabulary=vocabulary)[:2] if unseen else ({}, {}))
    gallery = _gallery(ecfg.gallery, ecfg.gallery_k, features, contrasts, generated=generated, sources=sources,
                       rows=rows, aspects=aspects, index=index, kernel=kernel, document=document)
    return RecallResult(table=table, intervals=intervals, heldout_table=heldout_table,
                        heldout_intervals=heldout_intervals, heldout_queries=len(unseen.prompts) if unseen else 0,
                        gallery=gallery, aspects=aspects, queries=len(sources), k=ecfg.recall_k,
                        weights=sorted(document["aspects"]) if document else [])


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """Prompts of generated Recall queries and the attributes each one asks for."""

    prompts: list[str]
    attributes: dict[str, list[Any]]
    name: str  # keys the generation seed


def heldout_queries(dataset_uri: str, aspects: list[str], n: int, seed: int) -> QuerySet | None:
    """Queries prompted with the attribute combinations the synthetic set held out of training
    (its marker's ``holdout``), so no training image matches a query exactly; None for other
    datasets."""
    holdout = tuple(tuple(entry.items()) for entry in (read_marker(dataset_uri) or {}).get("holdout", []))
    combos = [dict(subject=s, style=t, background=b) for s in SUBJECTS for t in STYLES for b in BACKGROUNDS]
    combos = [c for c in combos if is_held_out(c, holdout)]
    if not combos or n == 0:
        return None
    rng = random.Random(stable_seed("recall-heldout-prompts", seed))
    chosen = [rng.choice(combos) for _ in range(n)]
    return QuerySet([caption_for(c["subject"], c["style"], c["background"]) for c in chosen],
                    {a: [c[a] for c in chosen] for a in aspects}, "recall-heldout")


def _recall(cfg: ProjectConfig, adapter: DiffusersAdapter, featurizer: Featurizer, index: LoadedIndex, *, kernel: Kernel,
            document: dict[str, Any] | None,
            queries: QuerySet, train_attrs: dict[str, list[Any]], train_pixels: np.ndarray,
            vocabulary: dict[str, list[str]]) -> tuple[dict[str, dict[str, float]], dict[str, Any], list, Any, dict]:
    """The Recall@K table of one query set (every weighting, the contrastive rows and pixel
    kNN), its bootstrap intervals over queries, and the generated images, their features and
    their contrastive features per aspect (for the gallery)."""
    ecfg = cfg.evaluate
    generated = generate(adapter, prompts=queries.prompts, n=len(queries.prompts),
                         seed=stable_seed("evaluation-queries", ecfg.seed, queries.name),
                         guidance=cfg.weights.guidance, steps=cfg.weights.sample_steps)
    features = featurize_generated(featurizer, generated)
    channels, size = adapter.image_shape[0], adapter.image_shape[1]
    query_pixels = np.stack([decode_image(encode_png(g.image), f"query {i}", size, channels)
                             for i, g in enumerate(generated)])
    hits: dict[str, dict[str, np.ndarray]] = {}
    contrasts: dict[str, Any] = {}
    table = aspect_recall_table(features, index.layout, kernel, index.features, weights=document,
                                query_attributes=queries.attributes,
                                train_attributes=train_attrs, k=ecfg.recall_k, query_pixels=query_pixels, train_pixels=train_pixels, hits=hits)
    for a in vocabulary:  # Concept-TRAK: each query's prompt against the prompt without aspect a
        try:
            contrast = [without_concept(g.prompt, a, vocabulary, adapter.caption_template) for g in generated]
        except InputError as exc:
            log.warning("no contrastive %s queries: %s (weights.prompts.%s.values name the values)", a, exc, a)
            continue
        contrastive = contrasts[a] = featurize_generated(featurizer, generated, contrast=contrast)
        table[a].update(contrastive_recall(contrastive, index.layout, kernel, index.features, weights=document,
                                           aspect=a,
                                           asked=queries.attributes[a], truth=train_attrs[a], k=ecfg.recall_k, hits=hits))
    return table, recall_intervals(hits, ecfg.bootstrap, ecfg.seed), generated, features, contrasts


def _gallery(n: int, k: int, features, contrasts: dict[str, Any], *, generated, sources, rows, aspects,
             index: LoadedIndex, kernel: Kernel, document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The first ``n`` queries with their top-``k`` training examples under each learned
    weighting, uniform weights and each aspect's contrastive query (``subject, contrastive``),
    each example marked with the attributes it shares with the query."""
    if n == 0:
        return []
    learned = [a for a in ("general", *aspects) if document and a in document["aspects"]]
    doc = document or {"groups": list(index.layout.group_names), "aspects": {}}
    blocks = [index.features[i : i + 4096] for i in range(0, index.features.shape[0], 4096)]
    rankings: dict[str, tuple[Any, Any]] = {}
    names = [*learned, UNIFORM]
    scores, top = attribute(features[:n], weights_matrix(doc, names), index.layout, kernel, blocks=blocks, k=k)
    rankings.update({name: (scores[i], top[i]) for i, name in enumerate(names)})
    for a, contrastive in contrasts.items():
        scores, top = attribute(contrastive[:n], weights_matrix(doc, [UNIFORM]), index.layout, kernel, blocks=blocks,
                                k=k)
        rankings[f"{a}, contrastive"] = (scores[0], top[0])
    out = []
    for q in range(min(n, len(generated))):
        asked = {a: sources[q].attributes[a] for a in aspects}
        out.append({
            "prompt": generated[q].prompt, "attributes": asked, "image": encode_png(generated[q].image),
            "rankings": {name: [{"example_id": rows[j].example_id, "caption": rows[j].caption,
                                 "score": float(s), "image": rows[j].image,
                                 "shares": [a for a in aspects if rows[j].attributes[a] == asked[a]]}
                                for s, j in zip(scores[q].tolist(), top[q].tolist())]
                         for name, (scores, top) in rankings.items()},
        })
    return out
