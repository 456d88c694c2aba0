"""What a build is planned from: the dataset (read with Ray Data), its keys, the previous version."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import ray

from attribution_core.data.readers import FOLDER_LABEL, list_class_folder
from attribution_core.data.storage import filesystem_for
from attribution_core.index.manifest import FeatureSpec, check_same_features
from attribution_core.index.source import SourceSpec, keys_only, read_columns
from attribution_core.index.store import IndexStore
from pipelines.index.stages import normalize_batch

log = logging.getLogger(__name__)

KEYS_SCHEMA = pa.schema([("example_id", pa.string()), ("content_hash", pa.string())])


def read_source(spec: SourceSpec, keep: pa.Array | None = None) -> ray.data.Dataset:
    """The dataset as ``SOURCE_SCHEMA`` rows, read in parallel (only ``keep`` ids if given)."""
    fs, path = filesystem_for(spec.uri)
    if spec.layout == "parquet":
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


def scan_keys(spec: SourceSpec) -> pa.Table:
    """``(example_id, content_hash)`` of every example (one parallel pass over the data)."""
    keys = read_source(spec).map_batches(keys_only, batch_format="pyarrow")
    parts = [b.cast(KEYS_SCHEMA) for b in keys.iter_batches(batch_size=None, batch_format="pyarrow")]
    return pa.concat_tables(parts) if parts else KEYS_SCHEMA.empty_table()


def shard_keys(store: IndexStore, paths: list[str]) -> dict[str, pa.Table]:
    """Key columns of each shard (reads two string columns, never features)."""
    return {p: store.read_table(p, columns=["example_id", "content_hash"]).cast(KEYS_SCHEMA) for p in paths}


def concat_keys(tables: dict[str, pa.Table]) -> pa.Table | None:
    return pa.concat_tables(list(tables.values())) if tables else None


def choose_base(store: IndexStore, spec: FeatureSpec, mode: str) -> tuple[dict | None, dict | None]:
    """(previous committed manifest, the one to build on incrementally or None)."""
    previous = store.latest()
    if previous is None or mode == "full":
        return previous, None
    found = FeatureSpec.from_manifest(previous)
    if mode == "incremental":
        check_same_features(spec, found, f"the latest index version {previous['version']}",
                            "Build a new index with --full (or into another --out); versions never mix features.")
    elif spec.differences(found):
        log.info("the latest version %s was built differently (%s): full rebuild", previous["version"],
                 "; ".join(spec.differences(found)))
        return previous, None
    return previous, previous
