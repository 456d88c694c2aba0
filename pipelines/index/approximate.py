"""The index job's approximate search stage (``index.approximate``): train the product
quantisers on a seeded sample of the version's rows in one Ray task (in the space its kernel
whitens, ``Whitening``), then code every feature
shard on Ray Data, one code file per task (``attribution_core.index.approximate_files``).

A version whose base carries an approximate index with the same settings keeps its trained
quantisers and the code files of the shards it reuses: only new shards are coded. A rerun
after a crash keeps the trained index and code files it already wrote."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, TypedDict

import ray

from attribution_core.config import ApproximateConfig
from attribution_core.features.groups import GroupLayout
from attribution_core.index.approximate import (MAX_TRAIN_ROWS, AnnSettings, ApproximateIndex, Whitening,
                                                default_settings, padded_dim)
from attribution_core.index.approximate_files import (codes_path, load_trained, scaled_rows, trained_path,
                                                      training_rows, whitening_path, write_codes)
from attribution_core.index.manifest import IndexManifest, Shard
from attribution_core.index.reader import read_kernel
from attribution_core.index.store import IndexStore

log = logging.getLogger(__name__)


def wanted(acfg: ApproximateConfig, rows: int) -> bool:
    return acfg.build == "always" or (acfg.build == "auto" and rows >= acfg.min_rows)


def resolve_settings(acfg: ApproximateConfig, rows: int, dim: int) -> AnnSettings:
    """The config's settings, its zeros replaced by the defaults for ``rows`` rows."""
    auto = default_settings(rows, dim, acfg.seed)
    settings = AnnSettings(code_bytes=acfg.code_bytes or auto.code_bytes, candidates=acfg.candidates, seed=acfg.seed)
    settings.check(dim)
    return settings


def _train(store_uri: str, shards: list[Shard], layout: dict[str, Any], settings: dict[str, Any], *,
           path: str, whitening: str | None) -> None:
    """Train on a seeded sample (in the space ``whitening`` names) and write the empty trained
    index to ``path``."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the only work in flight: use the node
    store = IndexStore(store_uri)
    group_layout = GroupLayout.from_manifest(layout)
    ann = AnnSettings(**settings)
    sample = training_rows(store, shards, group_layout, ann.seed)
    space = Whitening.from_bytes(store.read_bytes(whitening)) if whitening else None
    index = ApproximateIndex.train(sample, group_layout.k_total, ann, space)
    store.write_bytes(path, index.to_bytes())


class CodedFile(TypedDict):
    """A Ray Data row of the coding pass: one codes file and the shards whose rows it holds."""

    path: str
    rows: int
    shards: list[str]


def code_shards(task: dict[str, Any], store_uri: str, layout: dict[str, Any], entry: dict[str, Any]) -> CodedFile:
    """Ray Data: code the rows of ``task['shards']`` into ``task['path']`` (kept when a crashed
    run already wrote it)."""
    import faiss

    faiss.omp_set_num_threads(1)  # one task per CPU
    store = IndexStore(store_uri)
    shards = list(task["shards"])
    if not store.exists(task["path"]):
        group_layout = GroupLayout.from_manifest(layout)
        index = load_trained(store, entry, group_layout.k_total)
        coded = [(s, index.encode(scaled_rows(store, s, group_layout))) for s in shards]
        write_codes(store, task["path"], coded, index.code_width)
    return CodedFile(path=task["path"], rows=int(task["rows"]), shards=shards)


def _tasks(version: str, shards: list[Shard], rows_per_task: int) -> list[dict[str, Any]]:
    tasks, current, rows = [], [], 0
    for shard in shards:
        current.append(shard.path)
        rows += shard.rows
        if rows >= rows_per_task:
            tasks.append({"path": codes_path(version, current), "rows": rows, "shards": current})
            current, rows = [], 0
    if current:
        tasks.append({"path": codes_path(version, current), "rows": rows, "shards": current})
    return tasks


def build_approximate(acfg: ApproximateConfig, *, store: IndexStore, version: str, shards: list[Shard],
                      layout: dict[str, Any], stats: dict[str, Any],
                      base: IndexManifest | None) -> dict[str, Any] | None:
    """The version's ``approximate`` manifest entry, or None when ``index.approximate`` builds
    none for this many rows. A new one codes in the space of this version's kernel (``stats``)."""
    rows = sum(s.rows for s in shards)
    if not wanted(acfg, rows):
        return None
    started = time.perf_counter()
    dim = GroupLayout.from_manifest(layout).k_total
    settings = resolve_settings(acfg, rows, dim)
    previous = base.approximate if base else None
    reuse = previous is not None and previous["settings"] == dataclasses.asdict(settings)
    current = {s.path for s in shards}
    if reuse:
        trained, trained_rows, space = previous["trained"], previous["trained_rows"], previous.get("whitening")
        blocks = [b for b in previous["blocks"] if current.intersection(b["shards"])]
    else:
        trained, trained_rows, blocks = trained_path(version), min(rows, MAX_TRAIN_ROWS), []
        whitening = Whitening.from_kernel(read_kernel(store, stats["blocks"]))
        space = whitening_path(version) if whitening else None
        if not store.exists(trained):  # else written by an interrupted run of this version
            if whitening:
                store.write_bytes(space, whitening.to_bytes())
            log.info("approximate index: training %d-byte codes on %d rows", settings.code_bytes, trained_rows)
            ray.get(ray.remote(_train).remote(store.uri, shards, layout, dataclasses.asdict(settings), path=trained,
                                              whitening=space))
    covered = {p for b in blocks for p in b["shards"]}
    todo = _tasks(version, [s for s in shards if s.path not in covered], acfg.rows_per_task)
    trained_s = time.perf_counter() - started
    entry = {"settings": dataclasses.asdict(settings), "trained": trained, "whitening": space,
             "trained_rows": trained_rows,
             "dim": dim, "padded_dim": padded_dim(dim)}
    if todo:
        log.info("approximate index: coding %d rows in %d task(s)%s", sum(t["rows"] for t in todo), len(todo),
                 f", keeping {len(covered)} shards' codes of {base.version}" if reuse else "")
        coded = ray.data.from_items(todo).map(code_shards, fn_kwargs={"store_uri": store.uri, "layout": layout,
                                                                      "entry": entry}).take_all()
        blocks += sorted(({"path": c["path"], "rows": c["rows"], "shards": list(c["shards"])} for c in coded),
                         key=lambda b: b["path"])
    return {**entry, "code_width": settings.code_width, "bytes_per_row": settings.code_width,  # no row ids kept
            "reused_from": base.version if reuse else None, "blocks": blocks,
            "seconds": {"train": round(trained_s, 3), "code": round(time.perf_counter() - started - trained_s, 3)}}
