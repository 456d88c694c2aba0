"""``attribution demo``: the main job end to end on the embedded default.

Writes the synthetic training set (once, ``data.uri``), trains the small text-to-image model
on it (once, ``model.path``), builds the attribution index of the whole set on Ray Data
(``index.out``; a rerun finds it up to date), generates a few query images with the model,
featurizes them with the same ``featurize`` settings and attributes each to its top-k training
examples with uniform group weights and the index's kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from attribution_core.config import ProjectConfig
from attribution_core.data.synthetic import caption_for
from attribution_core.data.writers import read_marker, write_synthetic
from attribution_core.features.featurize import Featurizer
from attribution_core.index.manifest import FeatureSpec, check_same_features
from attribution_core.index.reader import load_index
from attribution_core.index.scoring import attribute
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.sampling import generate
from pipelines.commands.train import train_to_dir
from pipelines.models import ensure_model, load_model
from pipelines.weights.queries import featurize_generated

# Query prompts of the demo: (subject, style, background).
SUBJECT_STYLE_BACKGROUND = (("circle", "filled", "grid"), ("triangle", "outlined", "solid"),
                            ("square", "striped", "gradient"), ("ring", "dotted", "noise"))

log = logging.getLogger(__name__)


def prepare(cfg: ProjectConfig) -> dict[str, Any]:
    """Make the demo's dataset and model if they are not there yet; say what was done."""
    done: dict[str, Any] = {}
    if read_marker(cfg.data.uri) is None:
        log.info("writing the synthetic dataset to %s", cfg.data.uri)
        write_synthetic(cfg.data.uri, cfg.data.synth_n, cfg.data.synth_seed, cfg.data.synth_size, cfg.data.holdout)
        done["data"] = "written"
    path = Path(cfg.model.path)
    if not (path / "unet" / "config.json").is_file():
        if cfg.model.build:
            ensure_model(cfg.model)
            done["model"] = f"built untrained ({cfg.model.build})"
        else:
            log.info("training the model (%d steps) into %s", cfg.train.steps, path)
            done["model"] = train_to_dir(cfg.data.uri, cfg.train, path)
    return done


def run(cfg: ProjectConfig) -> dict[str, Any]:
    from pipelines.index.job import IndexRequest, run_index

    prepared = prepare(cfg)
    built = run_index(cfg, IndexRequest(dataset=cfg.data.uri, model=str(ensure_model(cfg.model)), out=cfg.index.out))
    index = load_index(cfg.index.out, built["version"])
    adapter = load_model(cfg.model)
    featurizer = Featurizer(adapter, cfg.featurize)
    query_spec = FeatureSpec.build(model_fingerprint(adapter), cfg.featurize, featurizer.layout, index.manifest["dtype"])
    check_same_features(FeatureSpec.from_manifest(index.manifest), query_spec, "the query featurizer",
                        "Rebuild the index with this model and featurize settings.")

    prompts = [caption_for(*SUBJECT_STYLE_BACKGROUND[i % len(SUBJECT_STYLE_BACKGROUND)]) for i in range(cfg.demo.queries)]
    queries = generate(adapter, prompts=prompts if adapter.conditioning == "text" else None,
                       labels=[0] if adapter.conditioning == "class" else None, n=cfg.demo.queries, seed=cfg.demo.seed)
    q_flat = featurize_generated(featurizer, queries)  # queries enter like any image: bytes -> decode
    uniform = torch.ones(1, len(featurizer.layout.groups))
    blocks = (index.features[i : i + 4096] for i in range(0, index.features.shape[0], 4096))
    scores, idx = attribute(q_flat, uniform, featurizer.layout, index.kernel, blocks, cfg.demo.top_k)
    scores, idx = scores[0], idx[0]  # the one weighting: [Q, k]
    attributions = [
        {
            "query": prompts[qi],
            "top": [
                {"example_id": index.example_ids[j], "caption": index.captions[j] or "", "score": float(s)}
                for s, j in zip(scores[qi].tolist(), idx[qi].tolist())
            ],
        }
        for qi in range(len(queries))
    ]
    return {
        "prepared": prepared,
        "model": str(cfg.model.path),
        "data": cfg.data.uri,
        "conditioning": adapter.conditioning,
        "n_params": sum(p.numel() for p in adapter.denoiser.parameters()),
        "tracked_layers": len(featurizer.layout.layers),
        "groups": list(featurizer.layout.group_names),
        "k_total": featurizer.layout.k_total,
        "measurement": cfg.featurize.measurement,
        "rows_per_example": cfg.featurize.rows_per_example,
        "index": built,
        "kernel": index.manifest["stats"]["kernel"],
        "attributions": attributions,
    }


def summary_text(result: dict[str, Any]) -> str:
    built = result["index"]
    if built["up_to_date"]:
        index_line = f"index            {built['uri']} version {built['version']} is up to date"
    else:
        index_line = (f"index            {built['uri']} version {built['version']} ({built['mode']}): featurized "
                      f"{built['featurized']} examples x {result['rows_per_example']} rows ({result['measurement']}) "
                      f"in {built['stage_seconds']['featurize']} s = {built['rows_per_s']} examples/s with "
                      f"{built['actors']} actors; {built['bytes_per_example']} bytes/example")
    lines = [
        f"model            {result['model']} ({result['conditioning']} conditioning, "
        f"{result['n_params']:,} parameters)",
        f"tracked          {result['tracked_layers']} layers in {len(result['groups'])} groups, "
        f"k_total={result['k_total']}",
        index_line,
        f"rows             {built['rows']} indexed, {built['errors']} quarantined; kernel {result['kernel']}",
        "",
        "generated queries attributed with uniform group weights and the index kernel "
        "(`attribution learn-weights` learns aspect weights; `attribution serve` answers queries over HTTP):",
    ]
    for a in result["attributions"]:
        lines.append(f"  query: {a['query']}")
        for rank, t in enumerate(a["top"], start=1):
            lines.append(f"    {rank}. {t['score']:+.3e}  {t['example_id']}  {t['caption']}")
    return "\n".join(lines)
