"""Source rows for the index: any dataset layout -> ``SOURCE_SCHEMA`` batches.

The index job reads a dataset in parallel (Parquet files, or an image folder's
``metadata.jsonl``) and maps every batch through ``normalize`` so later steps see one shape:
``example_id``, ``content_hash``, ``uri``, ``image`` bytes, ``caption``, ``label``. The
content hash covers everything that changes an example's feature (image bytes, caption,
label), so an incremental reindex featurizes exactly the examples whose hash changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from attribution_core.data.readers import CAPTION_COLUMNS, IMAGE_COLUMN, detect_layout
from attribution_core.data.storage import filesystem_for, read_bytes
from attribution_core.errors import InputError
from attribution_core.features.seeding import content_id
from attribution_core.index.schema import SOURCE_SCHEMA


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """A dataset resolved once on the driver: its layout and which columns mean what."""

    uri: str
    layout: str  # "parquet" | "imagefolder"
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


def _first_jsonl_record(uri: str) -> dict[str, object]:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(f"{path}/metadata.jsonl") as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace")
    for line in head.splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{uri}/metadata.jsonl: first record is not JSON: {exc}") from exc
    raise InputError(f"{uri}/metadata.jsonl holds no records")


def resolve_source(uri: str, caption_column: str | None, label_column: str | None) -> SourceSpec:
    """Inspect the dataset at ``uri`` (schema only) and say which columns to use."""
    layout = detect_layout(uri)
    if layout == "parquet":
        fs, path = filesystem_for(uri)
        try:
            names = pads.dataset(path, filesystem=fs, format="parquet").schema.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"cannot read Parquet dataset {uri!r}: {exc}") from exc
        if IMAGE_COLUMN not in names:
            raise InputError(f"Parquet dataset {uri!r} has no {IMAGE_COLUMN!r} column (columns: {', '.join(names)})")
        has_id = "example_id" in names
    else:
        names = list(_first_jsonl_record(uri))
        if "file_name" not in names:
            raise InputError(f"{uri}/metadata.jsonl records need a 'file_name' field (found: {', '.join(names)})")
        has_id = True
    caption = caption_column if caption_column else next((c for c in CAPTION_COLUMNS if c in names), None)
    for wanted, what in ((caption_column, "caption"), (label_column, "label")):
        if wanted and wanted not in names:
            raise InputError(f"dataset {uri!r} has no {what} column {wanted!r} (columns: {', '.join(names)}); "
                             f"set index.{what}_column")
    return SourceSpec(uri=uri, layout=layout, caption_column=caption, label_column=label_column, has_example_id=has_id)


def read_columns(spec: SourceSpec) -> list[str]:
    """Columns to read from each source file."""
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
    if keep is not None and spec.layout == "imagefolder":
        batch = batch.filter(pc.is_in(batch.column("file_name").cast(pa.string()), value_set=keep))
    elif keep is not None and spec.has_example_id:
        batch = batch.filter(pc.is_in(batch.column("example_id").cast(pa.string()), value_set=keep))
    fs, root = filesystem_for(spec.uri)
    base = spec.uri.rstrip("/")
    rows = batch.to_pylist()
    out: dict[str, list] = {name: [] for name in SOURCE_SCHEMA.names}
    for row in rows:
        caption = _text(row.get(spec.caption_column)) if spec.caption_column else None
        label = _text(row.get(spec.label_column)) if spec.label_column else None
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
