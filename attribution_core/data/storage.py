"""Storage URIs: plain paths / ``file://`` (the embedded default) and ``s3://``.

S3 goes through pyarrow's ``S3FileSystem`` with the standard AWS environment variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) and an optional
endpoint override (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, e.g. a MinIO or a local
test server).
"""

from __future__ import annotations

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
