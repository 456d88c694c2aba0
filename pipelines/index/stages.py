"""The Ray Data callables of the index job; each maps one batch through one core call."""

from __future__ import annotations

import time
from typing import Any, TypedDict

import pyarrow as pa

from attribution_core.config import FeaturizeConfig, from_mapping
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.batch import ImageLimits, index_batch
from attribution_core.index.kernel import partial_gram
from attribution_core.index.source import SourceSpec, normalize
from attribution_core.index.store import IndexStore, shard_name
from pipelines.models import ModelRef
from pipelines.output import quiet_libraries

SUMMARY_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), ("errors", pa.int64()),
                            ("bytes", pa.int64()), ("seconds", pa.float64()), ("call", pa.int64()),
                            ("node", pa.string())])


def normalize_batch(batch: pa.Table, spec: dict[str, Any], keep: list | None = None) -> pa.Table:
    """Raw source rows -> ``SOURCE_SCHEMA``; ``keep`` is ``[ObjectRef]`` of the ids to keep."""
    ids = None
    if keep is not None:
        import ray

        ids = ray.get(keep[0])
    return normalize(batch, SourceSpec(**spec), ids)


def keys_with_file(batch: pa.Table, spec: dict[str, Any], root: str) -> pa.Table:
    """Raw Parquet rows read with their file's path -> ``(example_id, content_hash, file)``,
    ``file`` relative to the dataset root ``root``."""
    paths = [p[len(root):].lstrip("/") for p in batch.column("path").to_pylist()]
    rows = normalize(batch.drop_columns(["path"]), SourceSpec(**spec))
    return pa.table({"example_id": rows.column("example_id"), "content_hash": rows.column("content_hash"),
                     "file": pa.array(paths, pa.string())})


class IndexActor:
    """Holds the model; featurizes a batch of source rows and writes its shard atomically.

    Returns one summary row per batch. The shard's name is a digest of the batch's example
    ids, so a retried batch overwrites its own file instead of adding a second copy.
    """

    def __init__(self, *, model: ModelRef, featurize: dict[str, Any], device: str, threads: int, store_uri: str,
                 version: str, dtype: str, limits: dict[str, Any]) -> None:
        import ray
        import torch


        quiet_libraries()
        torch.set_num_threads(threads)
        self.featurizer = Featurizer(model.load(device), from_mapping(FeaturizeConfig, featurize))
        self.store = IndexStore(store_uri)
        self.folder = IndexStore.version_dir(version)
        self.dtype = dtype
        self.limits = ImageLimits(**limits)
        self.calls = 0  # batches this actor has done; the first one is its warm-up
        self.node = ray.get_runtime_context().get_node_id()  # rows per node, in the build summary

    def __call__(self, rows: pa.Table) -> pa.Table:
        if rows.num_rows == 0:
            return SUMMARY_SCHEMA.empty_table()
        start = time.perf_counter()
        name = shard_name(rows.column("example_id").to_pylist())
        result = index_batch(self.featurizer, rows, self.dtype, self.limits)
        size = 0
        if result.features.num_rows:
            size = self.store.write_table(f"{self.folder}/features/{name}", result.features)
        if result.errors.num_rows:
            self.store.write_table(f"{self.folder}/errors/{name}", result.errors)
        summary = {"shard": name, "rows": result.features.num_rows, "errors": result.errors.num_rows,
                   "bytes": size, "seconds": time.perf_counter() - start, "call": self.calls, "node": self.node}
        self.calls += 1
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)


class RewrittenShard(TypedDict):
    """A Ray Data row of the rewrite pass: the shard written and the rows it kept."""

    dst: str
    rows: int


def rewrite_shard(row: dict[str, Any], store_uri: str) -> RewrittenShard:
    """Copy the rows of ``row['src']`` whose id is in ``row['keep']`` to ``row['dst']``
    (skipped when ``dst`` is already committed: a resumed run)."""
    import pyarrow.compute as pc

    store = IndexStore(store_uri)
    if not store.exists(row["dst"]):
        table = store.read_table(row["src"])
        keep = pa.array(list(row["keep"]), type=pa.string())
        store.write_table(row["dst"], table.filter(pc.is_in(table.column("example_id"), value_set=keep)))
    return RewrittenShard(dst=row["dst"], rows=len(row["keep"]))


def gram_partition(batch: pa.Table, store_uri: str, layout: dict[str, Any], kind: str) -> pa.Table:
    """Partial Gram blocks (float64) over the feature shards listed in ``batch['path']``."""
    import io

    import numpy as np

    store = IndexStore(store_uri)
    group_layout = GroupLayout.from_manifest(layout)
    tables = (store.read_table(p) for p in batch.column("path").to_pylist())
    blocks = partial_gram(tables, group_layout, kind)
    names, payloads = [], []
    for name, matrix in blocks.items():
        buf = io.BytesIO()
        np.save(buf, matrix, allow_pickle=False)
        names.append(name)
        payloads.append(buf.getvalue())
    return pa.table({"block": pa.array(names, pa.string()), "gram": pa.array(payloads, pa.binary())})
