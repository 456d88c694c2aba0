"""``attribution bench index``: throughput and scaling of the index job on this cluster.

Writes a synthetic dataset and a demo-sized text-to-image model (random weights: speed does
not depend on them), then builds the index with 1 actor and with N actors (same threads per
actor) and reports rows/s for each, the scaling efficiency ``rps(N) / (N * rps(1))``, bytes
per example on storage, seconds per stage, and an incremental update after a share of the
dataset changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

from attribution_core.config import ProjectConfig
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset, write_synthetic
from attribution_core.index.store import IndexStore
from attribution_core.models.tiny import build_tiny_pipeline
from pipelines.index.job import IndexRequest, run_index
from pipelines.output import print_report
from pipelines.ray_runtime import cluster_cpus, ensure_ray


class BuildRun(TypedDict):
    actors: int
    threads_per_actor: int
    rows: int
    rows_per_s: float
    steady_rows_per_s: float | None
    seconds: float
    stage_seconds: dict[str, float]


def _build(cfg: ProjectConfig, data: str, model: str, out: str, *, actors: int, threads: int) -> BuildRun:

    cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, out=out, actors=actors, threads_per_actor=threads))
    result = run_index(cfg, IndexRequest(dataset=data, model=model, out=out, mode="full"))
    return BuildRun(actors=actors, threads_per_actor=threads, rows=result["rows"], rows_per_s=result["rows_per_s"],
                    steady_rows_per_s=result["steady_rows_per_s"], seconds=result["seconds"],
                    stage_seconds=result["stage_seconds"])


def main(args: argparse.Namespace) -> int:
    cfg = ProjectConfig.load(args.config)
    ensure_ray(args.ray_address)
    cpus = cluster_cpus()
    actors = args.actors or cpus
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-index-"))
    widths = tuple(int(w) for w in args.widths.split(","))
    model = str(build_tiny_pipeline("text", work / "model", resolution=args.resolution, widths=widths))
    data = str(work / "data")
    write_synthetic(data, args.n, seed=0, size=args.resolution, rows_per_file=256)
    start = time.perf_counter()
    one = _build(cfg, data, model, str(work / "index-1"), actors=1, threads=args.threads)
    many = _build(cfg, data, model, str(work / f"index-{actors}"), actors=actors, threads=args.threads)
    result: dict[str, Any] = {"examples": args.n, "cluster_cpus": cpus, "model_widths": list(widths),
                              "rows_per_example": cfg.featurize.rows_per_example, "runs": [one, many]}
    result["scaling_efficiency"] = round(many["rows_per_s"] / (actors * one["rows_per_s"]), 3)
    if many["steady_rows_per_s"] and one["steady_rows_per_s"]:
        result["steady_scaling_efficiency"] = round(many["steady_rows_per_s"] / (actors * one["steady_rows_per_s"]), 3)

    # Incremental update: change a share of the captions, add as many new examples.
    changed = max(1, int(args.n * args.change))
    rows = list(synthetic_rows(args.n, seed=0, size=args.resolution))  # the same rows as data
    for row in rows[:changed]:
        row["caption"] += " again"
    rows += [dict(r, example_id=f"added-{r['example_id']}") for r in synthetic_rows(changed, seed=1, size=args.resolution)]
    data2 = str(work / "data-v2")
    write_parquet_dataset(data2, rows, SYNTH_SCHEMA, {"kind": "synthetic"}, rows_per_file=256)

    out = str(work / f"index-{actors}")
    inc_cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, actors=actors, threads_per_actor=args.threads))
    inc = run_index(inc_cfg, IndexRequest(dataset=data2, model=model, out=out))
    result["incremental"] = {"changed": changed, "added": changed, "featurized": inc["featurized"], "mode": inc["mode"],
                             "seconds": inc["seconds"], "full_rebuild_seconds": many["seconds"]}
    manifest = IndexStore(out).manifest(inc["version"])
    k_total = manifest.layout["k_total"]
    result["k_total"] = k_total
    result["bytes_per_example"] = inc["bytes_per_example"]
    result["bytes_per_example_nominal"] = 2 * k_total if manifest.dtype == "float16" else 4 * k_total
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["work"] = str(work)
    print_report(result, args.json)
    return 0
