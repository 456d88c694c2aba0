"""What a build is planned from: the dataset (read with Ray Data), its keys, the previous version."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from attribution_core.data.readers import FOLDER_LABEL, list_class_folder
from attribution_core.data.storage import filesystem_for
from attribution_core.index.manifest import FeatureSpec, IndexManifest, check_same_features
from attribution_core.index.source import SourceSpec, keys_only, read_columns
from attribution_core.index.store import IndexStore
from pipelines.index.listing import KEYS_SCHEMA as FILE_KEYS_SCHEMA
from pipelines.index.listing import CurrentKeys, file_version, kept_keys, list_files, read_files_dataset
from pipelines.index.stages import keys_with_file, normalize_batch

log = logging.getLogger(__name__)

KEYS_SCHEMA = pa.schema([("example_id", pa.string()), ("content_hash", pa.string())])


def read_source(spec: SourceSpec, keep: pa.Array | None = None, files: list[str] | None = None) -> ray.data.Dataset:
    """The dataset as ``SOURCE_SCHEMA`` rows, read in parallel (only ``keep`` ids if given;
    of a Parquet dataset, only the listed ``files`` if given)."""
    fs, path = filesystem_for(spec.uri)
    if spec.layout == "parquet" and files is not None:
        raw = read_files_dataset(spec, files, read_columns(spec), with_paths=False)
    elif spec.layout == "parquet":
        raw = ray.data.read_parquet(path, filesystem=fs, columns=read_columns(spec), file_extensions=["parquet"])
    elif spec.layout == "classfolder":
        # The listing (paths and folder names, no image bytes) is made once here; the images
        # are read in parallel by normalize_batch, as an image folder's are.
        listing = list_class_folder(spec.uri)
        raw = ray.data.from_items([{"file_name": rel, FOLDER_LABEL: label} for rel, label in listing])
    else:
        # pyarrow reads newline-delimited JSON natively (lines=True would refuse a filesystem)
        raw = ray.data.read_json(f"{path}/metadata.jsonl", filesystem=fs)
    kwargs: dict[str, Any] = {"spec": spec.to_dict()}
    if keep is not None:
        kwargs["keep"] = [ray.put(keep)]  # one copy in the object store, fetched by each task
    return raw.map_batches(normalize_batch, fn_kwargs=kwargs, batch_format="pyarrow")


def scan_keys(spec: SourceSpec, files: list[str] | None = None) -> pa.Table:
    """``(example_id, content_hash)`` of every example (one parallel pass over the data);
    with ``files`` (Parquet), of the examples in those files, with a ``file`` column."""
    if files is not None:
        raw = read_files_dataset(spec, files, read_columns(spec), with_paths=True)
        _, root = filesystem_for(spec.uri)
        keys = raw.map_batches(keys_with_file, fn_kwargs={"spec": spec.to_dict(), "root": root},
                               batch_format="pyarrow")
        schema = FILE_KEYS_SCHEMA
    else:
        keys = read_source(spec).map_batches(keys_only, batch_format="pyarrow")
        schema = KEYS_SCHEMA
    parts = [b.cast(schema) for b in keys.iter_batches(batch_size=None, batch_format="pyarrow")]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def shard_keys(store: IndexStore, paths: list[str]) -> dict[str, pa.Table]:
    """Key columns of each shard (reads two string columns, never features)."""
    return {p: store.read_table(p, columns=["example_id", "content_hash"]).cast(KEYS_SCHEMA) for p in paths}


def concat_keys(tables: dict[str, pa.Table]) -> pa.Table | None:
    return pa.concat_tables(list(tables.values())) if tables else None


def choose_base(store: IndexStore, spec: FeatureSpec,
                mode: str) -> tuple[IndexManifest | None, IndexManifest | None]:
    """(previous committed manifest, the one to build on incrementally or None)."""
    previous = store.latest()
    if previous is None or mode == "full":
        return previous, None
    found = previous.spec
    if mode == "incremental":
        check_same_features(spec, found, f"the latest index version {previous.version}",
                            "Build a new index with --full (or into another --out); versions never mix features.")
    elif spec.differences(found):
        log.info("the latest version %s was built differently (%s): full rebuild", previous.version,
                 "; ".join(spec.differences(found)))
        return previous, None
    return previous, previous


def current_keys(spec: SourceSpec, store: IndexStore, previous: IndexManifest | None) -> CurrentKeys:
    """The keys of every example now, reading only the files that are new or changed since
    the previous version (image-folder layouts: every example)."""
    files = list_files(spec)
    if files is not None and "path" in read_columns(spec):  # Ray Data's file-path column would shadow it
        log.info("the dataset has a column named 'path': every file is read")
        files = None
    if files is None:
        return CurrentKeys(keys=scan_keys(spec), files=None)
    kept = kept_keys(store, previous, spec)
    unchanged: set[str] = set()
    reused = FILE_KEYS_SCHEMA.empty_table()
    if kept is not None:
        listed = {(f.path, f.size, f.version) for f in files}
        versions = map(file_version, kept.column("etag").to_pylist(), kept.column("mtime_ns").to_pylist())
        recorded = set(zip(kept.column("file").to_pylist(), kept.column("size").to_pylist(), versions))
        unchanged = {path for path, _, _ in recorded & listed}
        reused = kept.filter(pc.is_in(kept.column("file"), value_set=pa.array(sorted(unchanged), pa.string())))
        reused = reused.select(FILE_KEYS_SCHEMA.names).cast(FILE_KEYS_SCHEMA)
    to_read = [f.path for f in files if f.path not in unchanged]
    scanned = scan_keys(spec, to_read) if to_read else FILE_KEYS_SCHEMA.empty_table()
    log.info("dataset: %d files, %d unchanged (keys kept), %d read", len(files), len(unchanged), len(to_read))
    return CurrentKeys(keys=pa.concat_tables([reused, scanned.cast(FILE_KEYS_SCHEMA)]), files=files,
                       reused_files=len(unchanged), read_files=to_read)
