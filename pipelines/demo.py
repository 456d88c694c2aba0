"""``attribution demo``: the main job end to end on the embedded default.

Builds (once) a tiny text-to-image model under ``artifacts/demo/model``, draws a synthetic
training set and a few query images, featurizes both with the one ``featurize`` function,
writes the training features as Parquet, and attributes each query to its top-k training
examples with uniform group weights. Everything lands under ``demo.out``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attribution_core.models.adapters import ExampleBatch
from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.features.featurize import Featurizer, nonfinite_rows
from attribution_core.index.scoring import streaming_topk, weighted_queries
from attribution_core.data.synthetic import SyntheticExample, draw_example, to_pixels
from pipelines.models import load_model

log = logging.getLogger(__name__)


def _batch(examples: list[SyntheticExample]) -> ExampleBatch:
    return ExampleBatch(
        example_ids=tuple(e.example_id for e in examples),
        pixels=torch.from_numpy(to_pixels([e.image for e in examples])),
        captions=tuple(e.caption for e in examples),
    )


def _featurize_all(featurizer: Featurizer, examples: list[SyntheticExample], batch_size: int) -> torch.Tensor:
    parts = []
    for start in range(0, len(examples), batch_size):
        parts.append(featurizer.flat(_batch(examples[start : start + batch_size])))
        log.info("featurized %d/%d examples", min(start + batch_size, len(examples)), len(examples))
    return torch.cat(parts)


def _write_features(path: Path, examples: list[SyntheticExample], flat: torch.Tensor, featurizer: Featurizer) -> None:
    columns: dict[str, pa.Array] = {
        "example_id": pa.array([e.example_id for e in examples]),
        "caption": pa.array([e.caption for e in examples]),
        "subject": pa.array([e.subject for e in examples]),
        "style": pa.array([e.style for e in examples]),
        "background": pa.array([e.background for e in examples]),
    }
    half = flat.to(torch.float16).numpy()
    for g in featurizer.layout.groups:  # one fixed-size-list column per group: read one, decode one
        values = pa.array(half[:, g.offset : g.offset + g.dim].reshape(-1))
        columns[f"g.{g.name}"] = pa.FixedSizeListArray.from_arrays(values, g.dim)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def run(cfg: ProjectConfig) -> dict[str, Any]:
    out = Path(cfg.demo.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(cfg.model)
    featurizer = Featurizer(adapter, cfg.featurize)
    size = adapter.image_shape[1]
    train = [draw_example(cfg.demo.seed, i, size) for i in range(cfg.demo.examples)]
    queries = [draw_example(cfg.demo.seed + 1, i, size) for i in range(cfg.demo.queries)]

    start = time.perf_counter()
    flat = _featurize_all(featurizer, train, cfg.demo.batch_size)
    seconds = time.perf_counter() - start
    bad = int(nonfinite_rows(flat).sum())
    features_path = out / "features" / "train.parquet"
    _write_features(features_path, train, flat, featurizer)
    (out / "features" / "layout.json").write_text(
        json.dumps({"featurize": to_mapping(cfg.featurize), "layout": featurizer.layout.to_manifest()}, indent=2)
    )

    q_flat = featurizer.flat(_batch(queries))
    uniform = torch.ones(len(featurizer.layout.groups))
    wq = weighted_queries(q_flat, uniform, featurizer.layout)[0]  # [Q, k_total]
    blocks = (flat[i : i + 1024] for i in range(0, flat.shape[0], 1024))
    scores, idx = streaming_topk(wq, blocks, cfg.demo.top_k)
    attributions = [
        {
            "query": q.caption,
            "top": [
                {"example_id": train[j].example_id, "caption": train[j].caption, "score": float(s)}
                for s, j in zip(scores[qi].tolist(), idx[qi].tolist())
            ],
        }
        for qi, q in enumerate(queries)
    ]
    return {
        "model": str(cfg.model.path),
        "conditioning": adapter.conditioning,
        "n_params": sum(p.numel() for p in adapter.denoiser.parameters()),
        "tracked_layers": len(featurizer.layout.layers),
        "groups": list(featurizer.layout.group_names),
        "k_total": featurizer.layout.k_total,
        "measurement": cfg.featurize.measurement,
        "rows_per_example": cfg.featurize.rows_per_example,
        "examples": len(train),
        "nonfinite_examples": bad,
        "featurize_seconds": round(seconds, 3),
        "examples_per_s": round(len(train) / seconds, 2),
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
        "attribution with uniform group weights (untrained model: the ranking shows the "
        "plumbing, not meaning):",
    ]
    for a in result["attributions"]:
        lines.append(f"  query: {a['query']}")
        for rank, t in enumerate(a["top"], start=1):
            lines.append(f"    {rank}. {t['score']:+.3e}  {t['example_id']}  {t['caption']}")
    return "\n".join(lines)
