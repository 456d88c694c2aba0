"""Source rows for the index: any dataset layout -> ``SOURCE_SCHEMA`` batches.

The index job reads a dataset in parallel (Parquet files, an image folder's
``metadata.jsonl``, or the listing of a class-folder dataset) and maps every batch through
``normalize`` so later steps see one shape:
``example_id``, ``content_hash``, ``uri``, ``image`` bytes, ``caption``, ``label``. The
content hash covers everything that changes an example's feature (image bytes, caption,
label), so an incremental reindex featurizes exactly the examples whose hash changed.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from attribution_core.data.readers import (CAPTION_COLUMNS, IMAGE_COLUMN, LABEL_COLUMNS, dataset_columns,
                                           detect_layout, label_text)
from attribution_core.data.storage import filesystem_for, read_bytes
from attribution_core.errors import InputError
from attribution_core.features.seeding import content_id
from attribution_core.index.schema import SOURCE_SCHEMA


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A dataset resolved once on the driver: its layout and which columns mean what."""

    uri: str
    layout: str  # "parquet" | "imagefolder" | "classfolder"
    caption_column: str | None
    label_column: str | None
    has_example_id: bool

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def content_hash(image: bytes, caption: str | None, label: str | None) -> str:
    """Hex BLAKE2b-128 of what decides an example's feature besides its id."""
    h = hashlib.blake2b(digest_size=16)
    for part in (image, (caption or "").encode(), b"\x00" if caption is None else b"\x01",
                 (label or "").encode(), b"\x00" if label is None else b"\x01"):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def resolve_source(uri: str, caption_column: str | None, label_column: str | None,
                   conditioning: str = "none") -> SourceSpec:
    """Inspect the dataset at ``uri`` (schema only) and say which columns to use for a model
    of ``conditioning``; a column named but missing, or none where the model needs one, is
    an ``InputError`` saying which setting to change."""
    layout = detect_layout(uri)
    names = dataset_columns(uri, layout)
    if layout == "parquet" and IMAGE_COLUMN not in names:
        raise InputError(f"Parquet dataset {uri!r} has no {IMAGE_COLUMN!r} column (columns: {', '.join(names)})")
    if layout == "imagefolder" and "file_name" not in names:
        raise InputError(f"{uri}/metadata.jsonl records need a 'file_name' field (found: {', '.join(names)})")
    has_id = layout != "parquet" or "example_id" in names
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
    return SourceSpec(uri=uri, layout=layout, caption_column=caption,
                      label_column=label, has_example_id=has_id)


def read_columns(spec: SourceSpec) -> list[str]:
    """Columns to read from each source file (or listing row, for class folders)."""
    wanted = ["example_id", IMAGE_COLUMN] if spec.layout == "parquet" else ["file_name"]
    if not spec.has_example_id and "example_id" in wanted:
        wanted.remove("example_id")
    return wanted + [c for c in (spec.caption_column, spec.label_column) if c]


def _image_bytes(value: object) -> bytes:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else b""


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def normalize(batch: pa.Table, spec: SourceSpec, keep: pa.Array | None = None) -> pa.Table:
    """One batch of raw source rows -> ``SOURCE_SCHEMA`` (image folders: images are read here).

    With ``keep`` (string ids), rows whose example id is not in it are dropped, before an
    image folder's file is read."""
    if keep is not None and spec.layout != "parquet":
        batch = batch.filter(pc.is_in(batch.column("file_name").cast(pa.string()), value_set=keep))
    elif keep is not None and spec.has_example_id:
        batch = batch.filter(pc.is_in(batch.column("example_id").cast(pa.string()), value_set=keep))
    fs, root = filesystem_for(spec.uri)
    base = spec.uri.rstrip("/")
    rows = batch.to_pylist()
    out: dict[str, list] = {name: [] for name in SOURCE_SCHEMA.names}
    for row in rows:
        caption = _text(row.get(spec.caption_column)) if spec.caption_column else None
        label = label_text(row.get(spec.label_column)) if spec.label_column else None
        if spec.layout == "parquet":
            image = _image_bytes(row.get(IMAGE_COLUMN))
            eid = row.get("example_id")
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
        out["content_hash"].append(content_hash(image, caption, label))
        out["uri"].append(uri)
        out["image"].append(image)
        out["caption"].append(caption)
        out["label"].append(label)
    table = pa.Table.from_pydict(out, schema=SOURCE_SCHEMA)
    if keep is not None and not spec.has_example_id:  # ids are content hashes: known only now
        table = table.filter(pc.is_in(table.column("example_id"), value_set=keep))
    return table


def keys_only(batch: pa.Table) -> pa.Table:
    return batch.select(["example_id", "content_hash"])
