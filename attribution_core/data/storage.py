"""Storage URIs: plain paths / ``file://`` (the embedded default) and ``s3://``.

S3 goes through pyarrow's ``S3FileSystem`` with the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) and an optional
endpoint override (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, e.g. a MinIO or a local
test server).
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from attribution_core.errors import ConfigError

SCHEMES = ("file", "s3")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a storage URI or plain path."""
    if not uri:
        raise ConfigError("an empty storage URI was given; pass a path or an s3://bucket/prefix URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{uri!r} names no bucket; write s3://BUCKET/PREFIX")
        kwargs: dict[str, object] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, not a scheme
        raise ConfigError(f"unsupported storage scheme {parsed.scheme!r} in {uri!r}; use a path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def s3_listing_filesystem():
    """An s3fs filesystem from the same environment as ``filesystem_for`` (listings with ETags,
    which pyarrow's S3 file infos do not carry)."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    client = {k: v for k, v in (("endpoint_url", endpoint), ("region_name", region)) if v}
    return s3fs.S3FileSystem(client_kwargs=client, skip_instance_cache=True)


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
        """What tells two states of the file apart: the ETag where there is one, else the time."""
        return self.etag or str(self.mtime_ns)


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


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
