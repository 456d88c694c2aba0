"""Source rows for the index: any dataset layout -> ``SOURCE_SCHEMA`` batches.

The index job reads a dataset in parallel (Parquet files, an image folder's
``metadata.jsonl``, or the listing of a class-folder dataset) and maps every batch through
``normalize`` so later steps see one shape:
``example_id``, ``content_hash``, ``uri``, ``image`` bytes, ``caption``, ``label`` and
``metadata`` (the kept columns as a JSON object, null when none are kept). The content hash
covers everything stored for an example (image bytes, caption, label, kept columns), so an
incremental reindex featurizes exactly the examples whose hash changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc

from attribution_core.data.readers import (CAPTION_COLUMNS, IMAGE_COLUMN, LABEL_COLUMNS, dataset_columns,
                                           detect_layout, label_text)
from attribution_core.data.storage import filesystem_for, read_bytes
from attribution_core.errors import InputError
from attribution_core.seeding import content_id
from attribution_core.index.schema import SOURCE_SCHEMA


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A dataset resolved once on the driver: its layout and which columns mean what."""

    uri: str
    layout: str  # "parquet" | "imagefolder" | "classfolder"
    caption_column: str | None
    label_column: str | None
    has_example_id: bool
    image_column: str = IMAGE_COLUMN
    id_column: str = "example_id"  # read when has_example_id (Parquet); else ids are content hashes
    keep_columns: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def content_hash(image: bytes, caption: str | None, label: str | None, metadata: str | None = None) -> str:
    """Hex BLAKE2b-128 of what is stored for an example besides its id (its feature's inputs
    and, when columns are kept, their values)."""
    h = hashlib.blake2b(digest_size=16)
    parts = [image, (caption or "").encode(), b"\x00" if caption is None else b"\x01",
             (label or "").encode(), b"\x00" if label is None else b"\x01"]
    if metadata is not None:
        parts.append(metadata.encode())
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def resolve_source(uri: str, caption_column: str | None, label_column: str | None,
                   conditioning: str = "none", *, image_column: str = IMAGE_COLUMN, id_column: str | None = None,
                   keep_columns: tuple[str, ...] = ()) -> SourceSpec:
    """Inspect the dataset at ``uri`` (schema only) and say which columns to use for a model
    of ``conditioning``; a column named but missing, or none where the model needs one, is
    an ``InputError`` saying which setting to change."""
    layout = detect_layout(uri)
    names = dataset_columns(uri, layout)
    listing = ", ".join(names)
    if layout == "parquet" and image_column not in names:
        raise InputError(f"Parquet dataset {uri!r} has no image column {image_column!r} (columns: {listing}); "
                         "set data.image_column to the column holding the encoded images")
    if layout == "imagefolder" and "file_name" not in names:
        raise InputError(f"{uri}/metadata.jsonl records need a 'file_name' field (found: {listing})")
    if id_column and layout != "parquet":
        raise InputError(f"data.id_column is {id_column!r} but {uri!r} is an image folder, whose ids are its file "
                         "names; remove data.id_column")
    if id_column and id_column not in names:
        raise InputError(f"dataset {uri!r} has no id column {id_column!r} (columns: {listing}); set data.id_column "
                         "to the column of stable example ids, or remove it to use example_id / image hashes")
    missing = [c for c in keep_columns if c not in names]
    if missing:
        raise InputError(f"index.keep_columns names {', '.join(map(repr, missing))}, which dataset {uri!r} does not "
                         f"have (columns: {listing}); keep only columns the dataset has")
    has_id = layout != "parquet" or (id_column or "example_id") in names
    for wanted, what in ((caption_column, "caption"), (label_column, "label")):
        if wanted and wanted not in names:
            raise InputError(f"dataset {uri!r} has no {what} column {wanted!r} (columns: {', '.join(names)}); "
                             f"set train.{what}_column to the dataset's {what} column")
    caption = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    label = label_column or (next((c for c in LABEL_COLUMNS if c in names), None) if conditioning == "class" else None)
    if conditioning == "text" and caption is None:
        raise InputError(f"the model is text-conditioned but dataset {uri!r} has none of the caption columns "
                         f"{', '.join(CAPTION_COLUMNS)} (columns: {', '.join(names)}); set train.caption_column")
    if conditioning == "class" and label is None:
        raise InputError(f"the model is class-conditional but dataset {uri!r} has none of the label columns "
                         f"{', '.join(LABEL_COLUMNS)} (columns: {', '.join(names)}); set train.label_column")
    return SourceSpec(uri=uri, layout=layout, caption_column=caption, label_column=label, has_example_id=has_id,
                      image_column=image_column, id_column=id_column or "example_id",
                      keep_columns=tuple(keep_columns))


def read_columns(spec: SourceSpec) -> list[str]:
    """Columns to read from each source file (or listing row, for class folders)."""
    wanted = [spec.id_column, spec.image_column] if spec.layout == "parquet" else ["file_name"]
    if spec.layout == "parquet" and not spec.has_example_id:
        wanted.remove(spec.id_column)
    extra = [c for c in (spec.caption_column, spec.label_column, *spec.keep_columns) if c]
    return list(dict.fromkeys(wanted + extra))


def _image_bytes(value: object) -> bytes:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else b""


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _metadata(row: dict, columns: tuple[str, ...]) -> str | None:
    """The kept columns of a row as a JSON object (values JSON cannot hold become strings)."""
    if not columns:
        return None
    return json.dumps({c: row.get(c) for c in columns}, sort_keys=True, default=str)


def normalize(batch: pa.Table, spec: SourceSpec, keep: pa.Array | None = None) -> pa.Table:
    """One batch of raw source rows -> ``SOURCE_SCHEMA`` (image folders: images are read here).

    With ``keep`` (string ids), rows whose example id is not in it are dropped, before an
    image folder's file is read."""
    if keep is not None and spec.layout != "parquet":
        batch = batch.filter(pc.is_in(batch.column("file_name").cast(pa.string()), value_set=keep))
    elif keep is not None and spec.has_example_id:
        batch = batch.filter(pc.is_in(batch.column(spec.id_column).cast(pa.string()), value_set=keep))
    fs, root = filesystem_for(spec.uri)
    base = spec.uri.rstrip("/")
    rows = batch.to_pylist()
    out: dict[str, list] = {name: [] for name in SOURCE_SCHEMA.names}
    for row in rows:
        caption = _text(row.get(spec.caption_column)) if spec.caption_column else None
        label = label_text(row.get(spec.label_column)) if spec.label_column else None
        metadata = _metadata(row, spec.keep_columns)
        if spec.layout == "parquet":
            image = _image_bytes(row.get(spec.image_column))
            eid = row.get(spec.id_column) if spec.has_example_id else None
            eid = str(eid) if eid is not None else content_id(image)
            uri = f"{base}#{eid}"
        else:
            eid = str(row["file_name"])
            uri = f"{base}/{eid}"
            try:
                image = read_bytes(fs, f"{root}/{eid}")
            except (FileNotFoundError, OSError):
                image = b""  # quarantined as undecodable, with this example's id
        out["example_id"].append(eid)
        out["content_hash"].append(content_hash(image, caption, label, metadata))
        out["uri"].append(uri)
        out["image"].append(image)
        out["caption"].append(caption)
        out["label"].append(label)
        out["metadata"].append(metadata)
    table = pa.Table.from_pydict(out, schema=SOURCE_SCHEMA)
    if keep is not None and not spec.has_example_id:  # ids are content hashes: known only now
        table = table.filter(pc.is_in(table.column("example_id"), value_set=keep))
    return table


def keys_only(batch: pa.Table) -> pa.Table:
    return batch.select(["example_id", "content_hash"])
