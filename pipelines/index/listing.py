"""Reading only what changed: the keys of a Parquet dataset, file by file.

A build lists the dataset's files (path, size, modification time and, on S3, ETag: one
listing call, no reads) and keeps ``source_keys.parquet`` in its version: every example's id and content
hash with the file it came from and that file's size, time and ETag. The next build takes the
keys of every file whose path, size and ETag (where there is none: time) are unchanged from that table and reads (and
hashes) only the new and changed files; the featurize stage then opens only the files that
hold examples to featurize. A nightly build that adds a few files reads those files.

Kept keys are trusted only when the dataset is read the same way (the same URI, layout and
columns: the manifest's ``dataset`` section); otherwise, and for image-folder layouts, every
example is read as before.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from attribution_core.data.storage import filesystem_for
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.source import SourceSpec
from attribution_core.index.store import IndexStore

log = logging.getLogger(__name__)

SOURCE_KEYS = "source_keys.parquet"
KEYS_SCHEMA = pa.schema([("example_id", pa.string()), ("content_hash", pa.string()), ("file", pa.string())])
LISTED_SCHEMA = pa.schema([("file", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                           ("etag", pa.string())])
#: What must be equal for kept keys to mean the same thing (the manifest's ``dataset`` entries).
_READ_THE_SAME = ("uri", "layout", "caption_column", "label_column", "has_example_id", "image_column", "id_column",
                  "keep_columns")


def s3_listing_filesystem():
    """An s3fs filesystem from the same environment as ``filesystem_for`` (listings with ETags,
    which pyarrow's S3 file infos do not carry)."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    client = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", region)) if v}
    return s3fs.S3FileSystem(client_kwargs=client, skip_instance_cache=True)


def file_version(etag: str | None, mtime_ns: int) -> str:
    """What tells two states of a file apart: its ETag where there is one, else its time."""
    return etag or str(mtime_ns)


@dataclasses.dataclass(frozen=True)
class Listed:
    """One file of a listing: its path under the listed root, size, modification time and,
    on S3, ETag (a content checksum: it changes whenever the object's bytes do)."""

    path: str
    size: int
    mtime_ns: int
    etag: str | None = None

    @property
    def version(self) -> str:
        return file_version(self.etag, self.mtime_ns)


def list_tree(uri: str) -> list[Listed]:
    """Every file under ``uri`` (or ``uri`` itself when it is a file, with path ""), one
    listing call, nothing read; in path order."""
    fs, root = filesystem_for(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [Listed("", int(info.size), int(info.mtime_ns or 0), _etag(uri, root))]
    if urlparse(uri).scheme == "s3":
        found = s3_listing_filesystem().find(root, detail=True)
        files = [Listed(key[len(root):].lstrip("/"), int(d.get("size") or 0),
                        int(d["LastModified"].timestamp() * 1e9) if d.get("LastModified") else 0,
                        str(d.get("ETag") or "").strip('"') or None)
                 for key, d in found.items() if d.get("type") != "directory" and not key.endswith("/")]
        return sorted((f for f in files if f.path), key=lambda f: f.path)  # not the folder's own marker
    return sorted((Listed(e.path[len(root):].lstrip("/"), int(e.size), int(e.mtime_ns or 0))
                   for e in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if e.type == pafs.FileType.File),
                  key=lambda f: f.path)


def _etag(uri: str, root: str) -> str | None:
    if urlparse(uri).scheme != "s3":
        return None
    return str(s3_listing_filesystem().info(root).get("ETag") or "").strip('"') or None


@dataclasses.dataclass
class CurrentKeys:
    """Every example's keys now (``file``: the Parquet file it is in, null otherwise) and what
    it took to know them."""

    keys: pa.Table
    files: list[Listed] | None
    reused_files: int = 0
    read_files: list[str] = dataclasses.field(default_factory=list)

    def bytes_of(self, paths: list[str]) -> int:
        sizes = {f.path: f.size for f in self.files or []}
        return sum(sizes.get(p, 0) for p in paths)

    def files_holding(self, ids: pa.Array) -> list[str]:
        """The files that hold any of ``ids`` (sorted)."""
        mask = pc.is_in(self.keys.column("example_id"), value_set=ids)
        return sorted(set(self.keys.column("file").filter(mask).to_pylist()))


def list_files(spec: SourceSpec) -> list[Listed] | None:
    """The Parquet files of the dataset with size, time and (S3) ETag, in path order (hidden
    and ``_``-prefixed files left out, as Parquet readers do); None for other layouts."""
    if spec.layout != "parquet":
        return None
    return [f for f in list_tree(spec.uri) if (not f.path or f.path.endswith(".parquet"))
            and not any(part.startswith((".", "_")) for part in f.path.split("/"))]


def file_uri(spec: SourceSpec, rel: str) -> str:
    """Filesystem path of a listed file (``rel`` empty: the dataset is that one file)."""
    _, root = filesystem_for(spec.uri)
    return f"{root}/{rel}" if rel else root


def kept_keys(store: IndexStore, previous: IndexManifest | None, spec: SourceSpec) -> pa.Table | None:
    """The previous version's source keys with their files' size and time, when it read the
    dataset the same way."""
    if previous is None or not previous.dataset.get("source_keys"):
        return None
    recorded, now = previous.dataset, spec.to_dict()
    if any(_plain(recorded.get(k)) != _plain(now.get(k)) for k in _READ_THE_SAME):
        log.info("the dataset is read differently than for %s: every file is read again", previous.version)
        return None
    return store.read_table(previous.dataset["source_keys"])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def write_source_keys(store: IndexStore, version: str, current: CurrentKeys) -> str | None:
    """Write the version's ``source_keys.parquet`` (keys + each file's size and time); its path."""
    if current.files is None:
        return None
    listed = pa.Table.from_pylist([{"file": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "etag": f.etag}
                                   for f in current.files], schema=LISTED_SCHEMA)
    table = current.keys.join(listed, "file", join_type="left outer").sort_by("example_id")
    rel = f"{IndexStore.version_dir(version)}/{SOURCE_KEYS}"
    store.write_table(rel, table)
    return rel


def listing_summary(current: CurrentKeys) -> dict[str, Any] | None:
    """The manifest's record of the files a build saw (path, size, time, rows)."""
    if current.files is None:
        return None
    rows = pc.value_counts(current.keys.column("file")).to_pylist()
    per_file = {r["values"]: r["counts"] for r in rows}
    return [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, **({"etag": f.etag} if f.etag else {}),
             "rows": per_file.get(f.path, 0)} for f in current.files]


def read_files_dataset(spec: SourceSpec, files: list[str], columns: list[str], with_paths: bool) -> ray.data.Dataset:
    """Ray Data over the listed Parquet ``files`` only."""
    fs, _ = filesystem_for(spec.uri)
    return ray.data.read_parquet([file_uri(spec, f) for f in files], filesystem=fs, columns=columns,
                                 include_paths=with_paths)
