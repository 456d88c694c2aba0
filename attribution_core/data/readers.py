"""Readers for the two dataset layouts users have, local or on s3://.

- **Parquet** (a file or a folder of ``*.parquet``): an ``image`` column of encoded bytes
  (or the Hugging Face ``{bytes, path}`` struct), optional ``example_id`` (else the content
  hash of the image), optional caption column, any other columns kept as attributes.
- **Image folder** with ``metadata.jsonl`` (the Hugging Face ImageFolder convention): one
  JSON object per line with ``file_name`` (relative path) and any other fields; the
  example id is the file name.

Readers yield raw bytes; ``images.decode_image`` turns them into pixels, so a bad image
fails with its example id wherever it is first used.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from attribution_core.data.storage import exists, filesystem_for, read_bytes
from attribution_core.errors import InputError
from attribution_core.features.seeding import content_id

IMAGE_COLUMN = "image"
CAPTION_COLUMNS = ("caption", "text", "prompt")


@dataclasses.dataclass(frozen=True)
class RawExample:
    example_id: str
    image: bytes
    caption: str | None
    uri: str
    attributes: dict[str, Any]


def detect_layout(uri: str) -> str:
    """'parquet' or 'imagefolder' (a folder holding metadata.jsonl)."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"dataset {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        if path.endswith(".parquet"):
            return "parquet"
        raise InputError(f"dataset {uri!r} is a file but not .parquet; pass a Parquet file or folder, or an image folder")
    if exists(fs, f"{path}/metadata.jsonl"):
        return "imagefolder"
    return "parquet"


def _caption_column(names: list[str], wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in names else None
    return next((c for c in CAPTION_COLUMNS if c in names), None)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes")
    return value


def iter_parquet(uri: str, caption_column: str | None = None, batch_rows: int = 1024) -> Iterator[RawExample]:
    fs, path = filesystem_for(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (pa.ArrowInvalid, FileNotFoundError, OSError) as exc:
        raise InputError(f"cannot read Parquet dataset {uri!r}: {exc}") from exc
    names = dataset.schema.names
    if IMAGE_COLUMN not in names:
        raise InputError(f"Parquet dataset {uri!r} has no {IMAGE_COLUMN!r} column (columns: {', '.join(names)})")
    cap = _caption_column(names, caption_column)
    if caption_column and cap is None:
        raise InputError(f"Parquet dataset {uri!r} has no caption column {caption_column!r} (columns: {', '.join(names)})")
    others = [n for n in names if n not in (IMAGE_COLUMN, "example_id", cap)]
    # Files in name order and rows in file order, so a dataset reads the same every time.
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        for batch in fragment.to_batches(batch_size=batch_rows):
            rows = batch.to_pylist()
            for i, row in enumerate(rows):
                image = _image_bytes(row[IMAGE_COLUMN])
                eid = row.get("example_id")
                if eid is None:
                    eid = content_id(image) if image else f"{fragment.path}#{i}"
                yield RawExample(
                    example_id=str(eid),
                    image=image or b"",
                    caption=row.get(cap) if cap else None,
                    uri=f"{uri.rstrip('/')}#{eid}",
                    attributes={k: row[k] for k in others},
                )


def iter_imagefolder(uri: str, caption_column: str | None = None) -> Iterator[RawExample]:
    fs, path = filesystem_for(uri)
    text = read_bytes(fs, f"{path}/metadata.jsonl").decode("utf-8")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{uri}/metadata.jsonl line {lineno} is not JSON: {exc}") from exc
        name = record.pop("file_name", None)
        if not isinstance(name, str):
            raise InputError(f"{uri}/metadata.jsonl line {lineno} has no string 'file_name'")
        cap = _caption_column(list(record), caption_column)
        caption = record.pop(cap) if cap else None
        file_path = f"{path}/{name}"
        try:
            image = read_bytes(fs, file_path)
        except (FileNotFoundError, OSError):
            image = b""  # reported by the decoder with this example's id
        yield RawExample(example_id=name, image=image, caption=caption, uri=f"{uri.rstrip('/')}/{name}",
                         attributes=record)


def read_examples(uri: str, caption_column: str | None = None) -> Iterator[RawExample]:
    """Every example of the dataset at ``uri`` in a stable order."""
    if detect_layout(uri) == "imagefolder":
        return iter_imagefolder(uri, caption_column)
    return iter_parquet(uri, caption_column)
