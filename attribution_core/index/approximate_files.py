"""An index version's approximate search on storage, sharded like its features.

Under the version folder::

    approximate/trained.faiss               the trained, empty PQ index (FAISS's own format)
    approximate/whitening.npz               the space it codes in (``Whitening``; absent without a kernel)
    approximate/codes-<digest>.parquet      the codes of some feature shards' rows: columns
                                            ``shard`` (its path) and ``code`` (fixed-size bytes),
                                            each shard's rows together and in the shard's order

The manifest's ``approximate`` entry names them: ``settings`` (``AnnSettings``), ``trained``,
``whitening`` (or None), ``code_width`` and ``blocks`` (``{"path", "rows", "shards"}`` per code file). A searcher adds the
codes of its partition's shards, in its row order, to a copy of the trained index; a later
version with the same settings keeps the trained index and the code files of the shards it
reuses, and codes only its new shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from attribution_core.errors import ManifestMismatchError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.approximate import (MAX_TRAIN_ROWS, AnnSettings, ApproximateIndex, Whitening,
                                                training_sample)
from attribution_core.index.manifest import Shard
from attribution_core.index.schema import flat_matrix
from attribution_core.index.store import IndexStore

FOLDER = "approximate"


def trained_path(version: str) -> str:
    return f"{IndexStore.version_dir(version)}/{FOLDER}/trained.faiss"


def whitening_path(version: str) -> str:
    return f"{IndexStore.version_dir(version)}/{FOLDER}/whitening.npz"


def codes_path(version: str, shards: Iterable[str]) -> str:
    digest = hashlib.blake2b("\n".join(shards).encode(), digest_size=12).hexdigest()
    return f"{IndexStore.version_dir(version)}/{FOLDER}/codes-{digest}.parquet"


def scaled_rows(store: IndexStore, shard: str, layout: GroupLayout, dtype: np.dtype = np.float32) -> np.ndarray:
    """``[rows, k_total]``: a shard's rows as scores are taken against them (row scale applied)."""
    return flat_matrix(store.read_table(shard), layout, dtype)


def training_rows(store: IndexStore, shards: Sequence[Shard], layout: GroupLayout, seed: int,
                  *, limit: int = MAX_TRAIN_ROWS) -> np.ndarray:
    """A seeded sample of at most ``limit`` rows: whole shards in a seeded order until there
    are enough (shards are batches of the source in no meaningful order), then rows among them."""
    order = np.random.default_rng(seed).permutation(len(shards))
    parts, total = [], 0
    for i in order:
        if total >= limit:
            break
        parts.append(scaled_rows(store, shards[i].path, layout))
        total += len(parts[-1])
    return training_sample(np.concatenate(parts), seed, limit)


def load_trained(store: IndexStore, entry: dict[str, Any], dim: int) -> ApproximateIndex:
    settings = AnnSettings(**entry["settings"])
    whitening = Whitening.from_bytes(store.read_bytes(entry["whitening"])) if entry.get("whitening") else None
    return ApproximateIndex.from_bytes(store.read_bytes(entry["trained"]), dim, settings, whitening)


def write_codes(store: IndexStore, path: str, shard_codes: list[tuple[str, np.ndarray]], width: int) -> int:
    """One code file: each shard's ``[rows, width]`` uint8 codes, in order; returns its rows."""
    names = [name for name, codes in shard_codes for _ in range(len(codes))]
    flat = np.concatenate([codes for _, codes in shard_codes]) if shard_codes else np.empty((0, width), np.uint8)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.uint8()), width)
    store.write_table(path, pa.table({"shard": pa.array(names, type=pa.string()), "code": column}))
    return len(names)


def read_codes(store: IndexStore, path: str, wanted: set[str]) -> dict[str, np.ndarray]:
    """The codes of the shards in ``wanted`` that the code file at ``path`` holds."""
    table = store.read_table(path)
    names = table.column("shard").to_pylist()
    column = table.column("code").combine_chunks()
    codes = column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
    out, start = {}, 0
    for end in range(1, len(names) + 1):  # each shard's rows are together
        if end == len(names) or names[end] != names[start]:
            if names[start] in wanted:
                out[names[start]] = codes[start:end]
            start = end
    return out


def partition_index(store: IndexStore, entry: dict[str, Any], shards: Sequence[Shard], dim: int,
                    *, candidates: int = 0) -> ApproximateIndex:
    """The approximate index over ``shards``: the version's trained index (``entry``) with
    their codes added in their order, so candidate numbers are the partition's row numbers;
    ``candidates`` overrides the version's (0 keeps it)."""
    index = load_trained(store, entry, dim)
    settings = index.settings
    if candidates:
        settings = dataclasses.replace(settings, candidates=candidates)
        index = ApproximateIndex(index.index, dim, settings, index.whitening)
    wanted = {s.path for s in shards}
    found: dict[str, np.ndarray] = {}
    blocks = [b for b in entry["blocks"] if wanted.intersection(b["shards"])]
    for block in blocks:
        found.update(read_codes(store, block["path"], wanted))
    missing = sorted(wanted - set(found))
    if missing:
        raise ManifestMismatchError(f"the approximate index has no codes for {len(missing)} shard(s), e.g. "
                                    f"{missing[0]}; rebuild the version, or serve it with serve.search: exact")
    for shard in shards:
        codes = found[shard.path]
        if len(codes) != shard.rows:
            raise ManifestMismatchError(f"the approximate index holds {len(codes)} codes for {shard.path}, "
                                        f"which has {shard.rows} rows; rebuild the version")
        index.add_codes(codes)
    return index
