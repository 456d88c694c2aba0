"""Distributed scans for weight learning: candidate pools and noise moments (Ray Data).

The index's shards (or synthetic blocks, for the benchmark) are split into partitions; each
Ray Data task folds its rows into a ``ScanState`` and returns it; the driver merges them.
Queries and weightings travel once through the object store.
"""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import ray
import torch

from attribution_core.features.groups import GroupLayout
from attribution_core.index.schema import flat_matrix
from attribution_core.index.store import IndexStore
from attribution_core.weights.pools import ScanState, merge, scan_block
from attribution_core.weights.synthetic import index_blocks


def _rows(source: dict[str, Any], items: list[Any]):
    """``(ids, Tensor[b, k_total])`` of the shards or synthetic blocks in ``items``."""
    if source["kind"] == "index":
        store = IndexStore(source["uri"])
        layout = GroupLayout.from_manifest(source["layout"])
        for path in items:
            table = store.read_table(path)
            yield table.column("example_id").to_pylist(), torch.from_numpy(flat_matrix(table, layout))
    else:
        for number in items:
            yield from index_blocks(source["n"], source["k_total"], source["seed"], first=number, last=number + 1)


def scan_partition(batch: pa.Table, source: dict[str, Any], refs: list, r: int, *, with_noise: bool) -> pa.Table:
    grouped, weightings = ray.get(refs[0]), ray.get(refs[1])
    state = ScanState.empty(grouped.shape[0], weightings.shape[0], grouped.shape[1], with_noise)
    for ids, rows in _rows(source, batch.column("item").to_pylist()):
        state = scan_block(state, grouped, weightings, rows, ids=ids, r=r)
    return pa.table({"state": pa.array([pickle.dumps(state)], pa.binary())})


def scan(source: dict[str, Any], items: list[Any], grouped: torch.Tensor, weightings: torch.Tensor, *, r: int,
         with_noise: bool, partitions: int) -> ScanState:
    """Scan ``items`` (shard paths or synthetic block numbers) in ``partitions`` tasks."""
    refs = [ray.put(grouped), ray.put(weightings)]
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=max(1, min(partitions, len(items))))
    parts = ds.map_batches(scan_partition, batch_size=None, batch_format="pyarrow",
                           fn_kwargs={"source": source, "refs": refs, "r": r, "with_noise": with_noise})
    state = ScanState.empty(grouped.shape[0], weightings.shape[0], grouped.shape[1], with_noise)
    for batch in parts.iter_batches(batch_size=None, batch_format="pyarrow"):
        for payload in batch.column("state").to_pylist():
            state = merge(state, pickle.loads(payload), r)
    return state
