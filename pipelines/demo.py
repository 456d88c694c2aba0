"""``attribution demo``: the main job end to end on the embedded default.

Writes the synthetic training set (once, ``data.uri``), trains the small text-to-image model
on it (once, ``model.path``), featurizes training examples with the one ``featurize``
function, writes their features as Parquet, generates a few query images with the model and
attributes each to its top-k training examples with uniform group weights. Everything lands
under ``demo.out``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.loading import load_dataset
from attribution_core.data.synthetic import caption_for
from attribution_core.data.writers import read_marker, write_synthetic
from attribution_core.features.featurize import Featurizer, nonfinite_rows
from attribution_core.features.seeding import content_id
from attribution_core.index.scoring import streaming_topk, weighted_queries
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.sampling import generate
from attribution_core.models.training import TrainingData
from pipelines.commands.train import train_to_dir
from pipelines.models import ensure_model, load_model

# Query prompts of the demo: (subject, style, background).
SUBJECT_STYLE_BACKGROUND = (("circle", "filled", "grid"), ("triangle", "outlined", "solid"),
                            ("square", "striped", "gradient"), ("ring", "dotted", "noise"))

log = logging.getLogger(__name__)


def _batch(data: TrainingData, start: int, stop: int) -> ExampleBatch:
    return ExampleBatch(
        example_ids=tuple(data.example_ids[start:stop]),
        pixels=data.pixels[start:stop],
        captions=tuple(data.captions[start:stop]) if data.captions is not None else None,
    )


def _featurize_all(featurizer: Featurizer, data: TrainingData, batch_size: int) -> torch.Tensor:
    parts = []
    n = len(data.example_ids)
    for start in range(0, n, batch_size):
        parts.append(featurizer.flat(_batch(data, start, start + batch_size)))
        log.info("featurized %d/%d examples", min(start + batch_size, n), n)
    return torch.cat(parts)


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


def _write_features(path: Path, data: TrainingData, flat: torch.Tensor, featurizer: Featurizer) -> None:
    columns: dict[str, pa.Array] = {"example_id": pa.array(data.example_ids)}
    if data.captions is not None:
        columns["caption"] = pa.array(data.captions)
    for name, values in data.attributes.items():
        columns[name] = pa.array(values)
    half = flat.to(torch.float16).numpy()
    for g in featurizer.layout.groups:  # one fixed-size-list column per group: read one, decode one
        values = pa.array(half[:, g.offset : g.offset + g.dim].reshape(-1))
        columns[f"g.{g.name}"] = pa.FixedSizeListArray.from_arrays(values, g.dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def run(cfg: ProjectConfig) -> dict[str, Any]:
    out = Path(cfg.demo.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(cfg)
    adapter = load_model(cfg.model)
    featurizer = Featurizer(adapter, cfg.featurize)
    channels, size = adapter.image_shape[0], adapter.image_shape[1]
    data = load_dataset(cfg.data.uri, size, channels, adapter.conditioning)
    keep = min(cfg.demo.examples, len(data.example_ids))
    data = data.subset(torch.arange(keep))

    start = time.perf_counter()
    flat = _featurize_all(featurizer, data, cfg.demo.batch_size)
    seconds = time.perf_counter() - start
    bad = int(nonfinite_rows(flat).sum())
    features_path = out / "features" / "train.parquet"
    _write_features(features_path, data, flat, featurizer)
    (out / "features" / "layout.json").write_text(
        json.dumps({"featurize": to_mapping(cfg.featurize), "layout": featurizer.layout.to_manifest()}, indent=2)
    )

    prompts = [caption_for(*SUBJECT_STYLE_BACKGROUND[i % len(SUBJECT_STYLE_BACKGROUND)]) for i in range(cfg.demo.queries)]
    queries = generate(adapter, prompts=prompts if adapter.conditioning == "text" else None,
                       labels=[0] if adapter.conditioning == "class" else None, n=cfg.demo.queries, seed=cfg.demo.seed)
    pngs = [encode_png(q.image) for q in queries]  # queries enter like any image: bytes -> decode_image
    q_ids = tuple(content_id(png) for png in pngs)  # a query's id is the hash of its content
    q_batch = ExampleBatch(
        example_ids=q_ids,
        pixels=torch.from_numpy(np.stack([decode_image(png, qid, size, channels) for png, qid in zip(pngs, q_ids)])),
        captions=tuple(prompts) if adapter.conditioning == "text" else None,
    )
    q_flat = featurizer.flat(q_batch)
    uniform = torch.ones(len(featurizer.layout.groups))
    wq = weighted_queries(q_flat, uniform, featurizer.layout)[0]  # [Q, k_total]
    blocks = (flat[i : i + 1024] for i in range(0, flat.shape[0], 1024))
    scores, idx = streaming_topk(wq, blocks, cfg.demo.top_k)
    captions = data.captions or [""] * keep
    attributions = [
        {
            "query": prompts[qi],
            "top": [
                {"example_id": data.example_ids[j], "caption": captions[j], "score": float(s)}
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
        "examples": keep,
        "nonfinite_examples": bad,
        "featurize_seconds": round(seconds, 3),
        "examples_per_s": round(keep / seconds, 2),
        "bytes_per_example": 2 * featurizer.layout.k_total,
        "features": str(features_path),
        "attributions": attributions,
    }


def summary_text(result: dict[str, Any]) -> str:
    lines = [
        f"model            {result['model']} ({result['conditioning']} conditioning, "
        f"{result['n_params']:,} parameters)",
        f"tracked          {result['tracked_layers']} layers in {len(result['groups'])} groups, "
        f"k_total={result['k_total']} ({result['bytes_per_example']} bytes/example as float16)",
        f"featurized       {result['examples']} examples x {result['rows_per_example']} rows "
        f"({result['measurement']}) in {result['featurize_seconds']} s "
        f"= {result['examples_per_s']} examples/s; non-finite: {result['nonfinite_examples']}",
        f"features         {result['features']}",
        "",
        "generated queries attributed with uniform group weights (learned weights arrive with "
        "the weight-learning stage):",
    ]
    for a in result["attributions"]:
        lines.append(f"  query: {a['query']}")
        for rank, t in enumerate(a["top"], start=1):
            lines.append(f"    {rank}. {t['score']:+.3e}  {t['example_id']}  {t['caption']}")
    return "\n".join(lines)
