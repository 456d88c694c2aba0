"""Reading a committed index version: rows, features and kernel, checked against its manifest."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from attribution_core.errors import ManifestMismatchError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.opening import open_version
from attribution_core.index.schema import flat_matrix, row_scale
from attribution_core.index.store import IndexStore


@dataclasses.dataclass
class LoadedIndex:
    manifest: dict[str, Any]
    layout: GroupLayout
    example_ids: list[str]
    captions: list[str | None]
    uris: list[str]
    features: torch.Tensor  # [N, k_total] float32, each row times its row scale (what scores are taken against)
    kernel: list[tuple[int, int, torch.Tensor]]  # (offset, dim, K_b float64) blocks
    row_scale: torch.Tensor | None = None  # [N] float32 under a row-scaled measurement (DAS)

    def stored_features(self) -> torch.Tensor:
        """``[N, k_total]`` float64: the features as stored, before the row scale (the kernel's rows)."""
        if self.row_scale is None:
            return self.features.double()
        return self.features.double() / self.row_scale.double().clamp_min(1e-30)[:, None]


def read_kernel(store: IndexStore, manifest: dict[str, Any]) -> list[tuple[int, int, torch.Tensor]]:
    """The version's kernel as ``(offset, dim, K_b)`` blocks (float64)."""
    return [(b["offset"], b["dim"], torch.from_numpy(np.ascontiguousarray(store.read_array(b["kernel"]))))
            for b in manifest["stats"]["blocks"]]


def partition_shards(shards: list[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    """Split a version's shards into ``parts`` lists of near-equal row counts (largest shard
    first onto the lightest part; deterministic, so every searcher computes the same split)."""
    if parts < 1:
        raise ManifestMismatchError(f"parts must be >= 1, got {parts}")
    out: list[list[dict[str, Any]]] = [[] for _ in range(parts)]
    rows = [0] * parts
    for shard in sorted(shards, key=lambda s: (-s["rows"], s["path"])):
        lightest = min(range(parts), key=lambda p: (rows[p], p))
        out[lightest].append(shard)
        rows[lightest] += shard["rows"]
    return out


def load_index(uri: str, version: str | None = None, part: int = 0, parts: int = 1,
               dtype: np.dtype = np.float32) -> LoadedIndex:
    """The ``latest`` (or a named) committed version of the index at ``uri``, in memory.

    ``part`` of ``parts``: only that partition's shards (``partition_shards``), for
    searchers that split an index too large for one process. ``dtype``: of ``features``
    (float16 keeps the stored values in half the memory).
    """
    store = IndexStore(uri)
    manifest = open_version(store, version)
    layout = GroupLayout.from_manifest(manifest["layout"])
    shards = partition_shards(manifest["shards"], parts)[part] if parts > 1 else manifest["shards"]
    tables = [store.read_table(s["path"]) for s in shards]
    table = pa.concat_tables(tables) if tables else None
    ids = table.column("example_id").to_pylist() if table is not None else []
    expected = sum(s["rows"] for s in shards)
    if len(ids) != expected or (parts == 1 and expected != manifest["rows"]):
        raise ManifestMismatchError(f"{uri!r} version {manifest['version']}: manifest says {expected} rows, "
                                    f"shards hold {len(ids)}")
    features = (torch.from_numpy(flat_matrix(table, layout, dtype)) if table is not None
                else torch.empty(0, layout.k_total, dtype=torch.from_numpy(np.empty(0, dtype)).dtype))
    kernel = read_kernel(store, manifest)
    scale = row_scale(table) if table is not None else None
    return LoadedIndex(manifest=manifest, layout=layout, example_ids=ids,
                       captions=table.column("caption").to_pylist() if table is not None else [],
                       uris=table.column("uri").to_pylist() if table is not None else [],
                       features=features, kernel=kernel,
                       row_scale=torch.from_numpy(scale) if scale is not None else None)
