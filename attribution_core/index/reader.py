"""Reading a committed index version: rows, features and kernel, checked against its manifest."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_core.errors import ManifestMismatchError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.manifest import IndexManifest, Shard
from attribution_core.index.opening import open_version
from attribution_core.index.schema import METADATA, flat_matrix, row_scale
from attribution_core.index.store import IndexStore


@dataclasses.dataclass
class LoadedIndex:
    manifest: IndexManifest
    layout: GroupLayout
    example_ids: list[str]
    captions: list[str | None]
    uris: list[str]
    features: torch.Tensor  # [N, k_total] float32, each row times its row scale (what scores are taken against)
    kernel: list[tuple[int, int, torch.Tensor]]  # (offset, dim, K_b float64) blocks
    row_scale: torch.Tensor | None = None  # [N] float32 under a row-scaled measurement (DAS)
    metadata: list[str | None] | None = None  # [N] kept columns as JSON objects (index.keep_columns), else None

    def metadata_of(self, row: int) -> dict[str, Any]:
        return metadata_of(self.metadata, row)

    def stored_features(self) -> torch.Tensor:
        """``[N, k_total]`` float64: the features as stored, before the row scale (the kernel's rows)."""
        if self.row_scale is None:
            return self.features.double()
        return self.features.double() / self.row_scale.double().clamp_min(1e-30)[:, None]


def metadata_of(metadata: list[str | None] | None, row: int) -> dict[str, Any]:
    """The kept columns of row ``row`` of a version's rows ({} when the index keeps none)."""
    value = metadata[row] if metadata is not None else None
    return json.loads(value) if value else {}


def read_kernel(store: IndexStore, blocks: list[dict[str, Any]]) -> list[tuple[int, int, torch.Tensor]]:
    """A version's kernel (the ``blocks`` of its manifest's ``stats``) as ``(offset, dim, K_b)``
    blocks (float64)."""
    return [(b["offset"], b["dim"], torch.from_numpy(np.ascontiguousarray(store.read_array(b["kernel"]))))
            for b in blocks]


def partition_shards(shards: Sequence[Shard], parts: int) -> list[list[Shard]]:
    """Split a version's shards into ``parts`` lists of near-equal row counts (largest shard
    first onto the lightest part; deterministic, so every searcher computes the same split)."""
    if parts < 1:
        raise ManifestMismatchError(f"parts must be >= 1, got {parts}")
    out: list[list[Shard]] = [[] for _ in range(parts)]
    rows = [0] * parts
    for shard in sorted(shards, key=lambda s: (-s.rows, s.path)):
        lightest = min(range(parts), key=lambda p: (rows[p], p))
        out[lightest].append(shard)
        rows[lightest] += shard.rows
    return out


def version_shards(manifest: IndexManifest, part: int = 0, parts: int = 1) -> list[Shard]:
    """The shards of partition ``part`` of ``parts`` of a version, in the order its rows are numbered."""
    return partition_shards(manifest.shards, parts)[part] if parts > 1 else list(manifest.shards)


def _row_buffer(rows: int, dim: int, dtype: np.dtype, rows_dir: str | None) -> np.ndarray:
    """``[rows, dim]`` to fill: in memory, or a file in ``rows_dir`` mapped into memory. The
    file is unlinked at once, so the mapping keeps it only while it lives (and a crash leaves
    nothing behind)."""
    if rows_dir is None or rows == 0:
        return np.empty((rows, dim), dtype=dtype)
    Path(rows_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=rows_dir, prefix="attribution-rows-", delete=False) as f:
        path = f.name
    try:
        return np.memmap(path, dtype=dtype, mode="w+", shape=(rows, dim))
    finally:
        os.unlink(path)


def load_index(uri: str, *, version: str | None = None, part: int = 0, parts: int = 1,
               dtype: np.dtype = np.float32, rows_dir: str | None = None) -> LoadedIndex:
    """The ``latest`` (or a named) committed version of the index at ``uri``.

    ``part`` of ``parts``: only that partition's shards (``partition_shards``), for
    searchers that split an index too large for one process. ``dtype``: of ``features``
    (float16 keeps the stored values in half the memory). ``rows_dir``: the features go to a
    file there, mapped rather than held in memory (for searchers that read a few rows per query).
    """
    store = IndexStore(uri)
    manifest = open_version(store, version)
    layout = manifest.group_layout
    shards = version_shards(manifest, part, parts)
    expected = sum(s.rows for s in shards)
    features = _row_buffer(expected, layout.k_total, np.dtype(dtype), rows_dir)
    ids: list[str] = []
    captions: list[str | None] = []
    uris: list[str] = []
    scales: list[np.ndarray] = []
    metadata: list[str | None] = []
    for shard in shards:  # one shard at a time: no second copy of the features while reading
        table = store.read_table(shard.path)
        if table.num_rows != shard.rows or len(ids) + table.num_rows > expected:
            raise ManifestMismatchError(f"{uri!r} version {manifest.version}: manifest says {shard.rows} rows "
                                        f"for {shard.path}, the shard holds {table.num_rows}")
        features[len(ids) : len(ids) + table.num_rows] = flat_matrix(table, layout, dtype)
        ids += table.column("example_id").to_pylist()
        captions += table.column("caption").to_pylist()
        uris += table.column("uri").to_pylist()
        metadata += table.column(METADATA).to_pylist() if METADATA in table.column_names else [None] * table.num_rows
        scale = row_scale(table)
        if scale is not None:
            scales.append(scale)
    return LoadedIndex(manifest=manifest, layout=layout, example_ids=ids, captions=captions, uris=uris,
                       features=torch.from_numpy(features), kernel=read_kernel(store, manifest.stats["blocks"]),
                       row_scale=torch.from_numpy(np.concatenate(scales)) if scales else None,
                       metadata=metadata if any(m is not None for m in metadata) else None)
