"""Index storage: versions, shards and the ``latest`` pointer on a local path or s3://.

Layout under the index root::

    latest                              {"version": ..., "manifest": ...}; moved after a commit
    versions/<version>/features/part-<digest>.parquet
    versions/<version>/errors/part-<digest>.parquet
    versions/<version>/stats/...        Gram and kernel blocks (.npy)
    versions/<version>/manifest.json    written last: the version's commit marker

A version without ``manifest.json`` is a build in progress (or a crashed one that the same
command resumes). Every file is written atomically: on a local filesystem to a temporary
name then renamed; on S3 one PUT is atomic. A reader therefore sees a whole shard or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution_core.data.storage import exists, filesystem_for, read_bytes
from attribution_core.index.manifest import IndexManifest

MANIFEST = "manifest.json"
LATEST = "latest"
KINDS = ("features", "errors")
_TMP = ".tmp-"


def shard_name(example_ids: Iterable[str]) -> str:
    """Deterministic shard file name for a set of examples (a retried batch overwrites itself)."""
    h = hashlib.blake2b(digest_size=12)
    for eid in sorted(example_ids):
        h.update(eid.encode())
        h.update(b"\x00")
    return f"part-{h.hexdigest()}.parquet"


class IndexStore:
    """Reads and writes one index root."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem_for(uri)
        self._atomic_rename = isinstance(self.fs, pafs.LocalFileSystem)

    # ------------------------------------------------------------------ paths
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    @staticmethod
    def version_dir(version: str) -> str:
        return f"versions/{version}"

    def exists(self, rel: str) -> bool:
        return exists(self.fs, self.path(rel))

    # ------------------------------------------------------------------ atomic writes
    def _write(self, rel: str, write: Any) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not self._atomic_rename:
            write(target)  # one S3 PUT: visible whole or not at all
            return
        tmp = f"{target.rsplit('/', 1)[0]}/{_TMP}{uuid.uuid4().hex}"
        try:
            write(tmp)
            self.fs.move(tmp, target)
        finally:
            if exists(self.fs, tmp):
                self.fs.delete_file(tmp)

    def write_table(self, rel: str, table: pa.Table) -> int:
        """Write a Parquet file; returns its size in bytes."""
        # No dictionary pages: projected features have ~no repeats, and float16 dictionaries
        # made files 40 % larger than the raw values.
        self._write(rel, lambda p: pq.write_table(table, p, filesystem=self.fs, compression="zstd",
                                                  use_dictionary=False))
        return self.fs.get_file_info(self.path(rel)).size

    def write_bytes(self, rel: str, data: bytes) -> None:
        def put(p: str) -> None:
            with self.fs.open_output_stream(p) as f:
                f.write(data)
        self._write(rel, put)

    def write_json(self, rel: str, document: dict[str, Any]) -> None:
        self.write_bytes(rel, (json.dumps(document, indent=2, sort_keys=False) + "\n").encode())

    def write_array(self, rel: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        self.write_bytes(rel, buf.getvalue())

    # ------------------------------------------------------------------ reads
    def read_json(self, rel: str) -> dict[str, Any] | None:
        if not self.exists(rel):
            return None
        return json.loads(read_bytes(self.fs, self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        return read_bytes(self.fs, self.path(rel))

    def read_array(self, rel: str) -> np.ndarray:
        return np.load(io.BytesIO(read_bytes(self.fs, self.path(rel))), allow_pickle=False)

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    def list_shards(self, version: str, kind: str) -> list[str]:
        """Committed shard files of ``kind`` in a version, as paths relative to the root."""
        folder = f"{self.version_dir(version)}/{kind}"
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(folder), allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
        return [f"{folder}/{n}" for n in names if n.endswith(".parquet") and not n.startswith(_TMP)]

    def list_versions(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path("versions"), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def is_committed(self, version: str) -> bool:
        return self.exists(f"{self.version_dir(version)}/{MANIFEST}")

    def remove_temporaries(self, version: str) -> int:
        """Delete half-written files a crashed writer left in ``version``; returns how many."""
        infos = self.fs.get_file_info(
            pafs.FileSelector(self.path(self.version_dir(version)), recursive=True, allow_not_found=True))
        stale = [i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(_TMP)]
        for p in stale:
            self.fs.delete_file(p)
        return len(stale)

    # ------------------------------------------------------------------ versions
    def manifest(self, version: str) -> IndexManifest | None:
        """The committed manifest of ``version``, or None when it is not committed."""
        rel = f"{self.version_dir(version)}/{MANIFEST}"
        doc = self.read_json(rel)
        return None if doc is None else IndexManifest.from_json(doc, f"{self.uri}/{rel}")

    def latest(self) -> IndexManifest | None:
        """The committed manifest the ``latest`` pointer names, or None for an empty root."""
        version = self.latest_version()
        return None if version is None else self.manifest(version)

    def latest_version(self) -> str | None:
        """The version the ``latest`` pointer names (one small read), or None."""
        pointer = self.read_json(LATEST)
        return None if pointer is None else pointer["version"]

    def commit(self, manifest: IndexManifest, publish: bool = True) -> None:
        """Write the manifest (the commit marker), then (``publish``) move ``latest`` to it."""
        self.write_json(f"{self.version_dir(manifest.version)}/{MANIFEST}", manifest.to_json())
        if publish:
            self.publish(manifest.version)

    def publish(self, version: str) -> None:
        """Move ``latest`` to a committed version (one atomic object write)."""
        manifest = self.manifest(version)
        if manifest is None:
            raise FileNotFoundError(f"{self.uri}: version {version} is not committed; nothing to publish")
        self.write_json(LATEST, {"version": version, "manifest": f"{self.version_dir(version)}/{MANIFEST}",
                                 "committed_at": manifest.created_at})
