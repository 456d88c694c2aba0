"""Writing image datasets as Parquet (local or s3://), in the layout the readers read.

A dataset is a folder of ``part-NNNNN.parquet`` files plus ``_dataset.json`` written last,
as the commit marker that says what the folder holds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, TypedDict

import pyarrow as pa
import pyarrow.parquet as pq

from attribution_core.data.images import encode_png
from attribution_core.data.storage import exists, filesystem_for, read_bytes, write_bytes
from attribution_core.data.synthetic import Holdout, check_holdout, draw_example
from attribution_core.data.textures import draw_texture
from attribution_core.errors import ConfigError

MARKER = "_dataset.json"


def read_marker(uri: str) -> dict[str, Any] | None:
    fs, path = filesystem_for(uri)
    if not exists(fs, f"{path}/{MARKER}"):
        return None
    return json.loads(read_bytes(fs, f"{path}/{MARKER}"))


def write_parquet_dataset(
    uri: str, rows: Iterable[dict[str, Any]], schema: pa.Schema, metadata: dict[str, Any], *, rows_per_file: int = 4096
) -> int:
    """Write ``rows`` (dicts matching ``schema``) as part files, then the marker; returns the
    row count. Refuses a folder that already holds anything. A local folder appears only
    when complete (written under a temporary name, then renamed), so an interrupted write
    never leaves a partial dataset where a later run would take it for a whole one."""
    fs, path = filesystem_for(uri)
    if exists(fs, path):
        previous = read_marker(uri)
        listing = fs.get_file_info(pa.fs.FileSelector(path, allow_not_found=True))
        if previous is None and listing:
            raise ConfigError(f"{uri!r} exists and is not a dataset written by this tool; choose an empty --out")
        if previous is not None:
            raise ConfigError(f"{uri!r} already holds a dataset ({previous.get('kind')}); choose another --out or delete it")
    local = isinstance(fs, pa.fs.LocalFileSystem)
    target = path
    if local:
        path = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
        fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    count, part = 0, 0
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal part
        table = pa.Table.from_pylist(buffer, schema=schema)
        pq.write_table(table, f"{path}/part-{part:05d}.parquet", filesystem=fs)
        part += 1
        buffer.clear()

    for row in rows:
        buffer.append(row)
        count += 1
        if len(buffer) >= rows_per_file:
            flush()
    if buffer or part == 0:
        flush()
    write_bytes(fs, f"{path}/{MARKER}", json.dumps({**metadata, "rows": count, "files": part}, indent=2).encode())
    if local:
        if exists(fs, target):  # an empty folder (checked above)
            os.rmdir(target)
        os.rename(path, target)
    return count


SYNTH_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("subject", pa.string()),
    ("style", pa.string()),
    ("background", pa.string()),
])


def synthetic_rows(n: int, seed: int, size: int, holdout: Holdout = ()) -> Iterator[dict[str, Any]]:
    for i in range(n):
        ex = draw_example(seed, i, size, holdout)
        yield {"example_id": ex.example_id, "image": encode_png(ex.image), "caption": ex.caption,
               "subject": ex.subject, "style": ex.style, "background": ex.background}


TEXTURE_SCHEMA = pa.schema([("example_id", pa.string()), ("image", pa.binary()), ("label", pa.string())])


def texture_rows(n: int, seed: int, size: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        ex = draw_texture(seed, i, size)
        yield {"example_id": ex.example_id, "image": encode_png(ex.image), "label": ex.label}


SYNTHETIC_KINDS = ("shapes", "textures")


class SyntheticSet(TypedDict):
    """The marker a synthetic set is written with (``read_marker``), plus its rows and URI."""

    kind: str
    set: str
    n: int
    seed: int
    size: int
    holdout: list[dict[str, str]]
    rows: int
    uri: str


def write_synthetic(uri: str, n: int, seed: int, *, size: int = 32, holdout: Holdout = (), rows_per_file: int = 4096,
                    kind: str = "shapes") -> SyntheticSet:
    """Write a synthetic set, deterministic from ``seed``: ``shapes`` (subject / style /
    background with captions) or ``textures`` (class-labelled texture photographs)."""
    if kind not in SYNTHETIC_KINDS:
        raise ConfigError(f"unknown synthetic set {kind!r}; choose one of {', '.join(SYNTHETIC_KINDS)}")
    if kind == "textures" and holdout:
        raise ConfigError("a holdout names attribute combinations of the shapes set; the textures set has none")
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if size < 8:
        raise ConfigError(f"--size must be >= 8 pixels, got {size}")
    check_holdout(holdout)
    metadata = {"kind": "synthetic", "set": kind, "n": n, "seed": seed, "size": size,
                "holdout": [dict(entry) for entry in holdout]}
    if kind == "textures":
        rows = write_parquet_dataset(uri, texture_rows(n, seed, size), TEXTURE_SCHEMA, metadata,
                                     rows_per_file=rows_per_file)
    else:
        rows = write_parquet_dataset(uri, synthetic_rows(n, seed, size, holdout), SYNTH_SCHEMA, metadata,
                                     rows_per_file=rows_per_file)
    return SyntheticSet(**metadata, rows=rows, uri=uri)
