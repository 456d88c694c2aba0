"""Planning a build: which examples to featurize, which rows to reuse, which to drop.

Inputs are small key tables (``example_id``, ``content_hash``), never features:

- ``current``: every example of the dataset now;
- ``previous``: per shard of the previous version (same feature spec), its keys;
- ``done``: keys already committed by an interrupted run of this same build.

An example is reused when the previous version holds it with the same content hash;
featurized when it is new, changed, or was never committed; dropped when it left the
dataset. A previous shard whose rows are all reused is referenced as it is; one that lost
rows is rewritten with the rows that remain, so the new version equals a full rebuild.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from attribution_core.errors import InputError


@dataclasses.dataclass(frozen=True)
class ShardReuse:
    """What to do with one shard of the previous version."""

    path: str  # relative to the index root
    rows: int
    keep: tuple[str, ...]  # example ids that stay (all of them: reference the file as it is)

    @property
    def whole(self) -> bool:
        return len(self.keep) == self.rows


@dataclasses.dataclass(frozen=True)
class Plan:
    todo: pa.Array  # string ids to featurize in this run
    reuse: tuple[ShardReuse, ...]  # previous feature shards that keep rows
    reuse_errors: tuple[ShardReuse, ...]  # previous errors shards that keep rows
    n_current: int
    n_new: int
    n_changed: int
    n_removed: int
    n_reused: int
    n_done: int

    @property
    def is_noop(self) -> bool:
        """Nothing to featurize, nothing dropped and every previous shard kept whole."""
        return (len(self.todo) == 0 and self.n_removed == 0 and self.n_changed == 0
                and all(r.whole for r in self.reuse + self.reuse_errors))


def check_unique(keys: pa.Table, where: str) -> None:
    ids = keys.column("example_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise InputError(f"{where} repeats example ids (e.g. {repeated}); ids must be unique. "
                         "Give each example a unique example_id (or drop the column to use content hashes)")


def keys_digest(keys: pa.Table) -> str:
    """Order-independent hash of a key table."""
    pairs = sorted(zip(keys.column("example_id").to_pylist(), keys.column("content_hash").to_pylist()))
    h = hashlib.blake2b(digest_size=16)
    for eid, chash in pairs:
        h.update(f"{eid}\x00{chash}\x01".encode())
    return h.hexdigest()


def _pairs(keys: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(keys.column("example_id"), keys.column("content_hash"), "\x00")


def _reuse(shards: dict[str, pa.Table], current_pairs: pa.Array) -> tuple[list[ShardReuse], set[str]]:
    out, kept_ids = [], set()
    for path in sorted(shards):
        keys = shards[path]
        mask = pc.is_in(_pairs(keys), value_set=current_pairs)
        keep = keys.column("example_id").filter(mask).to_pylist()
        if keep:
            out.append(ShardReuse(path=path, rows=keys.num_rows, keep=tuple(keep)))
            kept_ids.update(keep)
    return out, kept_ids


def plan_build(current: pa.Table, previous: dict[str, pa.Table] | None,
               previous_errors: dict[str, pa.Table] | None, done: pa.Table | None) -> Plan:
    """Plan one build (see module doc). ``previous`` maps shard path -> its keys."""
    current_pairs = _pairs(current)
    reuse, reused_ids = _reuse(previous or {}, current_pairs)
    reuse_errors, reused_error_ids = _reuse(previous_errors or {}, current_pairs)
    previous_ids: set[str] = set()
    for table in list((previous or {}).values()) + list((previous_errors or {}).values()):
        previous_ids.update(table.column("example_id").to_pylist())
    current_ids = current.column("example_id")
    done_ids = set(done.column("example_id").to_pylist()) if done is not None else set()
    skip = pa.array(sorted(reused_ids | reused_error_ids | done_ids), type=pa.string())
    todo = current_ids.filter(pc.invert(pc.is_in(current_ids, value_set=skip)))
    current_set = set(current_ids.to_pylist())
    n_new = len(current_set - previous_ids) if previous is not None else len(current_set)
    return Plan(
        todo=todo.combine_chunks() if isinstance(todo, pa.ChunkedArray) else todo,
        reuse=tuple(reuse),
        reuse_errors=tuple(reuse_errors),
        n_current=len(current_set),
        n_new=n_new,
        n_changed=len((current_set & previous_ids) - reused_ids - reused_error_ids),
        n_removed=len(previous_ids - current_set),
        n_reused=len(reused_ids) + len(reused_error_ids),
        n_done=len(done_ids),
    )
