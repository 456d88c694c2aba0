"""Aspect Recall@K on the main index and the report's gallery.

Queries are images the attributed model generates from training captions; each query's
known attributes are those of the example whose caption prompted it. For every attribute
column of the dataset that is an aspect (subject, style, background), Recall@K is the share
of the query's top-K training examples with the query's value: under the aspect's learned
weights, the general weights, uniform weights, and pixel-space nearest neighbours.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np

from attribution_core.config import ProjectConfig
from attribution_core.config_stages import ASPECTS
from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.readers import read_examples
from attribution_core.evaluation.recall import aspect_recall_table
from attribution_core.features.seeding import stable_seed
from attribution_core.index.opening import version_featurizer
from attribution_core.index.reader import LoadedIndex
from attribution_core.index.scoring import attribute
from attribution_core.models.sampling import generate
from attribution_core.weights.artifact import UNIFORM, weights_matrix
from pipelines.models import load_model_dir
from pipelines.weights.queries import featurize_generated

log = logging.getLogger(__name__)


def run_recall(cfg: ProjectConfig, index: LoadedIndex, document: dict[str, Any] | None) -> dict[str, Any]:
    """``{"table": {aspect: {...}}, "gallery": [...], ...}``; ``skipped`` says why when the
    model or the dataset cannot give queries of known attributes."""
    ecfg = cfg.evaluate
    manifest = index.manifest
    adapter = load_model_dir(manifest["model"]["path"])
    if adapter.conditioning != "text":
        return {"table": {}, "gallery": [], "skipped": f"the model is {adapter.conditioning}-conditioned; "
                "queries of known attributes are prompted with captions"}
    raw = {e.example_id: e for e in read_examples(manifest["dataset"]["uri"], manifest["dataset"].get("caption_column"))}
    rows = [raw[eid] for eid in index.example_ids]
    aspects = [a for a in ASPECTS if a != "general" and all(e.attributes.get(a) is not None for e in rows)]
    if not aspects or ecfg.recall_queries == 0:
        return {"table": {}, "gallery": [], "skipped": "the dataset has no subject, style or background column"
                if not aspects else "evaluate.recall_queries is 0"}
    rng = random.Random(stable_seed("recall-query-prompts", ecfg.seed))
    sources = [rng.choice([e for e in rows if e.caption]) for _ in range(ecfg.recall_queries)]
    generated = generate(adapter, prompts=[e.caption for e in sources], n=len(sources),
                         seed=stable_seed("evaluation-queries", ecfg.seed, "recall"),
                         guidance=cfg.weights.guidance, steps=cfg.weights.sample_steps)
    featurizer = version_featurizer(adapter, manifest, cfg.featurize.max_rows_per_pass)
    features = featurize_generated(featurizer, generated)
    kernel = index.kernel if cfg.weights.use_kernel else None
    channels, size = adapter.image_shape[0], adapter.image_shape[1]
    train_pixels = np.stack([decode_image(e.image, e.example_id, size, channels) for e in rows])
    query_pixels = np.stack([decode_image(encode_png(g.image), f"query {i}", size, channels)
                             for i, g in enumerate(generated)])
    query_attrs = {a: [e.attributes[a] for e in sources] for a in aspects}
    train_attrs = {a: [e.attributes[a] for e in rows] for a in aspects}
    table = aspect_recall_table(features, index.layout, kernel, index.features, document, query_attrs, train_attrs,
                                ecfg.recall_k, query_pixels, train_pixels)
    gallery = _gallery(ecfg.gallery, ecfg.gallery_k, features, generated, sources, rows, aspects, index, kernel, document)
    return {"table": table, "gallery": gallery, "aspects": aspects, "queries": len(sources), "k": ecfg.recall_k,
            "weights": sorted(document["aspects"]) if document else []}


def _gallery(n: int, k: int, features, generated, sources, rows, aspects, index: LoadedIndex, kernel,
             document: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The first ``n`` queries with their top-``k`` training examples under each learned
    weighting (and uniform), each marked with the attributes it shares with the query."""
    if n == 0:
        return []
    learned = [a for a in ("general", *aspects) if document and a in document["aspects"]]
    names = [*learned, UNIFORM]
    doc = document or {"groups": list(index.layout.group_names), "aspects": {}}
    blocks = [index.features[i : i + 4096] for i in range(0, index.features.shape[0], 4096)]
    scores, top = attribute(features[:n], weights_matrix(doc, names), index.layout, kernel, blocks, k)
    out = []
    for q in range(min(n, len(generated))):
        asked = {a: sources[q].attributes[a] for a in aspects}
        out.append({
            "prompt": generated[q].prompt, "attributes": asked, "image": encode_png(generated[q].image),
            "rankings": {name: [{"example_id": rows[j].example_id, "caption": rows[j].caption,
                                 "score": float(s), "image": rows[j].image,
                                 "shares": [a for a in aspects if rows[j].attributes[a] == asked[a]]}
                                for s, j in zip(scores[i, q].tolist(), top[i, q].tolist())]
                         for i, name in enumerate(names)},
        })
    return out
