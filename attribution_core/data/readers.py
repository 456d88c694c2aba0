"""Readers for the three dataset layouts users have, local or on s3://.

- **Parquet** (a file or a folder of ``*.parquet``): an ``image`` column of encoded bytes
  (or the Hugging Face ``{bytes, path}`` struct), optional ``example_id`` (else the content
  hash of the image), optional caption column, any other columns kept as attributes.
- **Image folder** with ``metadata.jsonl`` (the Hugging Face ImageFolder convention): one
  JSON object per line with ``file_name`` (relative path) and any other fields; the
  example id is the file name.
- **Class folders** (torchvision's ``ImageFolder``, Hugging Face ``imagefolder`` without
  metadata): ``<root>/<class>/**/<image>``; the example id is the path under the root and
  the class (the top-level folder's name) is the ``label`` column. Images directly under
  the root have no label; a root with no sub-folders is a plain, unlabelled image folder.

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
from attribution_core.seeding import content_id

IMAGE_COLUMN = "image"
CAPTION_COLUMNS = ("caption", "text", "prompt")
LABEL_COLUMNS = ("label", "labels", "class")
"""Label columns looked for, in order, when a class-conditional model's recipe names none."""
FOLDER_LABEL = "label"
"""The label column of the class-folder layout (folder names)."""
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LAYOUTS = ("parquet", "imagefolder", "classfolder")


@dataclasses.dataclass(frozen=True)
class RawExample:
    example_id: str
    image: bytes
    caption: str | None
    uri: str
    attributes: dict[str, Any]


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def detect_layout(uri: str) -> str:
    """One of ``LAYOUTS``: 'parquet' (a .parquet file, or a folder holding .parquet files at
    its top or, partitioned, in its sub-folders), 'imagefolder' (a folder holding
    metadata.jsonl) or 'classfolder' (a folder of images, in one sub-folder per class)."""
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
    top = [i for i in fs.get_file_info(pafs.FileSelector(path)) if not _hidden(i.base_name)]
    files = [i.base_name for i in top if i.type == pafs.FileType.File]
    if any(f.endswith(".parquet") for f in files):
        return "parquet"
    if any(_is_image(f) for f in files):
        return "classfolder"
    for folder in (i.path for i in top if i.type == pafs.FileType.Directory):
        inside = [i.base_name for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
                  if i.type == pafs.FileType.File]
        if any(f.endswith(".parquet") for f in inside):
            return "parquet"  # partitioned (e.g. year=2024/part-0.parquet)
        if any(_is_image(f) for f in inside):
            return "classfolder"
    raise InputError(f"dataset {uri!r} holds no .parquet files, no metadata.jsonl and no images "
                     f"({', '.join(IMAGE_EXTENSIONS)}); point data.uri (or --dataset) at the dataset itself")


def dataset_present(uri: str) -> bool:
    """Whether ``uri`` holds anything: a file, or a folder with at least one entry."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def list_class_folder(uri: str) -> list[tuple[str, str | None]]:
    """``(path under the root, class)`` of every image of a class-folder dataset, sorted by
    path; the class is the top-level folder's name (None for images at the root). Hidden
    files and folders (a leading '.' or '_') are skipped."""
    fs, path = filesystem_for(uri)
    root = path.rstrip("/") + "/"
    out: list[tuple[str, str | None]] = []
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type != pafs.FileType.File or not info.path.startswith(root):
            continue
        rel = info.path[len(root):]
        parts = rel.split("/")
        if _is_image(rel) and not any(_hidden(p) for p in parts):
            out.append((rel, parts[0] if len(parts) > 1 else None))
    if not out:
        raise InputError(f"dataset {uri!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(out)


def label_text(value: Any) -> str | None:
    """One spelling of a class label wherever it is read: integers (also integral floats, as
    pandas writes an integer column with gaps) as their decimal digits, anything else as str."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _first_jsonl_record(uri: str) -> dict[str, Any]:
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


def dataset_columns(uri: str, layout: str | None = None) -> list[str]:
    """Column names of the dataset at ``uri`` (schema only: Parquet's schema, the first
    metadata.jsonl record's fields, or ``file_name`` and ``label`` of class folders)."""
    layout = layout or detect_layout(uri)
    if layout == "classfolder":
        return ["file_name", FOLDER_LABEL]
    if layout == "imagefolder":
        return list(_first_jsonl_record(uri))
    fs, path = filesystem_for(uri)
    try:
        return list(pads.dataset(path, filesystem=fs, format="parquet").schema.names)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"cannot read Parquet dataset {uri!r}: {exc}") from exc


def caption_column_of(uri: str, wanted: str | None = None) -> str | None:
    """The caption column the readers use for ``uri``: ``wanted``, else the first of
    ``CAPTION_COLUMNS`` the dataset has (None: no captions)."""
    return wanted or _caption_column(dataset_columns(uri), None)


def _caption_column(names: list[str], wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in names else None
    return next((c for c in CAPTION_COLUMNS if c in names), None)


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes")
    return value


def iter_parquet(uri: str, caption_column: str | None = None, batch_rows: int = 1024, *,
                 image_column: str = IMAGE_COLUMN, id_column: str | None = None) -> Iterator[RawExample]:
    fs, path = filesystem_for(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except (pa.ArrowInvalid, FileNotFoundError, OSError) as exc:
        raise InputError(f"cannot read Parquet dataset {uri!r}: {exc}") from exc
    names = dataset.schema.names
    if image_column not in names:
        raise InputError(f"Parquet dataset {uri!r} has no image column {image_column!r} (columns: {', '.join(names)}); "
                         "set data.image_column to the column holding the encoded images")
    if id_column and id_column not in names:
        raise InputError(f"Parquet dataset {uri!r} has no id column {id_column!r} (columns: {', '.join(names)}); "
                         "set data.id_column to the column of stable example ids, or remove it")
    ids = id_column or "example_id"
    cap = _caption_column(names, caption_column)
    if caption_column and cap is None:
        raise InputError(f"Parquet dataset {uri!r} has no caption column {caption_column!r} (columns: {', '.join(names)})")
    others = [n for n in names if n not in (image_column, ids, cap)]
    # Files in name order and rows in file order, so a dataset reads the same every time.
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        for batch in fragment.to_batches(batch_size=batch_rows):
            rows = batch.to_pylist()
            for i, row in enumerate(rows):
                image = _image_bytes(row[image_column])
                eid = row.get(ids)
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


def iter_classfolder(uri: str) -> Iterator[RawExample]:
    fs, path = filesystem_for(uri)
    listing = list_class_folder(uri)
    labelled = any(label is not None for _, label in listing)
    for rel, label in listing:
        try:
            image = read_bytes(fs, f"{path}/{rel}")
        except (FileNotFoundError, OSError):
            image = b""  # reported by the decoder with this example's id
        yield RawExample(example_id=rel, image=image, caption=None, uri=f"{uri.rstrip('/')}/{rel}",
                         attributes={FOLDER_LABEL: label} if labelled else {})


def dataset_read_options(dataset: dict[str, Any]) -> dict[str, Any]:
    """``read_examples`` keyword arguments for an index version's dataset (its manifest's
    ``dataset`` section): the image and id columns it was indexed with."""
    id_column = dataset.get("id_column") if dataset.get("has_example_id") else None
    return {"image_column": dataset.get("image_column") or IMAGE_COLUMN,
            "id_column": None if id_column == "example_id" else id_column}


def read_examples(uri: str, caption_column: str | None = None, *, image_column: str = IMAGE_COLUMN,
                  id_column: str | None = None) -> Iterator[RawExample]:
    """Every example of the dataset at ``uri`` in a stable order (Parquet: images from
    ``image_column``, ids from ``id_column``, else ``example_id``, else image hashes)."""
    layout = detect_layout(uri)
    if layout == "imagefolder":
        return iter_imagefolder(uri, caption_column)
    if layout == "classfolder":
        if caption_column:
            raise InputError(f"dataset {uri!r} is a class-folder dataset, which has no caption column "
                             f"{caption_column!r}; train it class-conditional (train.conditioning: class)")
        return iter_classfolder(uri)
    return iter_parquet(uri, caption_column, image_column=image_column, id_column=id_column)
