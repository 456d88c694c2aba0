"""The end of an index build: exactly-once check, stats pass, manifest, ``latest``."""

from __future__ import annotations

import io
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from attribution_core.errors import IncompleteBuildError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.kernel import add_grams, blocks, kernel_from_gram
from attribution_core.index.manifest import KernelBlock, KernelStats
from attribution_core.index.quarantine import check_quarantine, too_many_quarantined
from attribution_core.index.store import IndexStore, shard_name
from pipelines.index.stages import gram_partition

log = logging.getLogger(__name__)


def shard_ids(store: IndexStore, paths: list[str]) -> dict[str, list[str]]:
    return {p: store.read_table(p, columns=["example_id"]).column("example_id").to_pylist() for p in paths}


def dedupe(store: IndexStore, shard_ids: dict[str, list[str]]) -> dict[str, list[str]]:
    """Keep each example in the first shard (by path) that holds it; rewrite the others
    without it. Only a task retried with a different batch composition can cause this.

    Shard names are digests of their ids, so a rewrite whose name is already taken finds
    exactly the rows it wanted in that file; the file is then claimed as it is."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for path in sorted(shard_ids):
        if path in out:  # claimed by an earlier rewrite
            continue
        ids = shard_ids[path]
        fresh = [i for i in ids if i not in seen]
        seen.update(fresh)
        if len(fresh) == len(ids):
            out[path] = ids
            continue
        log.warning("%s repeats %d examples held by another shard; rewriting it", path, len(ids) - len(fresh))
        if fresh:
            dst = f"{path.rsplit('/', 1)[0]}/{shard_name(fresh)}"
            if dst not in shard_ids:
                table = store.read_table(path)
                store.write_table(dst, table.filter(pc.is_in(table.column("example_id"), value_set=pa.array(fresh))))
            out[dst] = fresh
        store.fs.delete_file(store.path(path))
    return out


def check_exactly_once(expected: set[str], features: dict[str, list[str]], errors: dict[str, list[str]]) -> None:
    counts = Counter(i for ids in list(features.values()) + list(errors.values()) for i in ids)
    repeated = [i for i, c in counts.items() if c > 1]
    missing = expected - set(counts)
    extra = set(counts) - expected
    if repeated or missing or extra:
        raise IncompleteBuildError(
            f"the build is not exactly-once: {len(missing)} examples missing (e.g. {sorted(missing)[:3]}), "
            f"{len(repeated)} repeated (e.g. {sorted(repeated)[:3]}), {len(extra)} not in the dataset "
            f"(e.g. {sorted(extra)[:3]}); rerun the same command to finish it")


def refuse_if_quarantined(store: IndexStore, reused: dict[str, list[str]], staged: dict[str, list[str]],
                          total: int, *, max_fraction: float, scope: str = "the dataset") -> None:
    """Raise ``QuarantineError`` (nothing committed) when more than ``max_fraction`` of the
    ``total`` examples are quarantined. This build's own error shards are removed first, so
    that a rerun after the fix looks at those examples again instead of resuming their errors."""
    shards = {**reused, **staged}
    if not too_many_quarantined(sum(len(ids) for ids in shards.values()), total, max_fraction):
        return
    errors: list[tuple[str, str]] = []
    for path in sorted(shards):
        table = store.read_table(path, columns=["example_id", "reason"])
        errors += zip(table.column("example_id").to_pylist(), table.column("reason").to_pylist())
    for path in staged:
        store.fs.delete_file(store.path(path))
    check_quarantine(errors, total, max_fraction, scope)


def gram_pass(store: IndexStore, paths: list[str], layout: GroupLayout, kind: str,
              *, partitions: int) -> list[tuple[str, int, int, np.ndarray]]:
    """``(block, offset, dim, C_b)`` Gram blocks of the stored features, summed over
    ``partitions`` Ray Data tasks."""
    total: dict[str, np.ndarray] | None = None
    if paths:
        items = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=min(partitions, len(paths)))
        partials = items.map_batches(gram_partition, batch_size=None, batch_format="pyarrow",
                                     fn_kwargs={"store_uri": store.uri, "layout": layout.to_manifest(), "kind": kind})
        for batch in partials.iter_batches(batch_size=None, batch_format="pyarrow"):
            for name, payload in zip(batch.column("block").to_pylist(), batch.column("gram").to_pylist()):
                part = {name: np.load(io.BytesIO(payload), allow_pickle=False)}
                total = add_grams(total, part)
    return [(name, offset, dim, total[name] if total is not None else np.zeros((dim, dim)))
            for name, offset, dim in blocks(layout, kind)]


def write_stats(store: IndexStore, version: str, grams: list[tuple[str, int, int, np.ndarray]], kind: str,
                *, damping: float) -> KernelStats:
    """Write each Gram block and its kernel at ``damping``; the manifest's ``stats``."""
    out_blocks: list[KernelBlock] = []
    for name, offset, dim, gram in grams:
        kernel, lam = kernel_from_gram(gram, damping)
        safe = name.replace("/", "_")
        rel = f"{IndexStore.version_dir(version)}/stats"
        store.write_array(f"{rel}/gram.{safe}.npy", gram)
        store.write_array(f"{rel}/kernel.{safe}.npy", kernel)
        out_blocks.append({"name": name, "offset": offset, "dim": dim, "lambda": lam,
                           "gram": f"{rel}/gram.{safe}.npy", "kernel": f"{rel}/kernel.{safe}.npy"})
    return {"kernel": kind, "damping": damping, "dtype": "float64", "blocks": out_blocks}
