"""A lease on the storage root, so that overlapping scheduled runs do not both do the work.

The lease is one small JSON object (``<root>/<name>``) naming its holder and when it
expires. Every change is a compare-and-swap, so two runners can never both believe they
hold it:

- on S3, conditional writes: ``If-None-Match: *`` creates it only if absent, ``If-Match:
  <etag>`` replaces exactly the version that was read (a stale lease is taken over, a held
  one renewed or released);
- on a local or mounted path, the same read-compare-write under an exclusive ``flock`` on a
  guard file next to it.

A holder that dies leaves a lease that expires after ``ttl_s``; the next run takes it over.
A long run renews it (``renew``) before it expires.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TypedDict
from urllib.parse import urlparse

from attribution_core.errors import LeaseHeldError, LeaseLostError

LEASE_NAME = "reindex.lease"


class LeaseRecord(TypedDict):
    """The lease object's JSON: who holds the lease, from where, until when."""

    owner: str
    host: str
    pid: int
    acquired_at: float
    expires_at: float
    token: str


@dataclasses.dataclass
class _Stored:
    record: LeaseRecord | None
    version: str | None  # S3 ETag, or the record's token for a local file


class _LocalBackend:
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.guard = self.path.with_name(f".{self.path.name}.guard")

    def swap(self, expected: str | None, record: LeaseRecord | None, must_exist: bool) -> str | None:
        """Write ``record`` (or delete when None) if the stored version is ``expected``
        (None: absent); returns the new version, or raises ``_Conflict``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.guard, "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            current = self.read()
            if current.version != expected or (must_exist and current.record is None):
                raise _Conflict(current)
            if record is None:
                self.path.unlink(missing_ok=True)
                return None
            tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)
            return record["token"]

    def read(self) -> _Stored:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return _Stored(None, None)
        return _Stored(record, record.get("token"))


class _S3Backend:
    def __init__(self, uri: str) -> None:
        import botocore.session
        from botocore.config import Config

        parsed = urlparse(uri)
        self.bucket, self.key = parsed.netloc, parsed.path.lstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        self.client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint or None, region_name=region, config=Config(retries={"max_attempts": 3}))

    def swap(self, expected: str | None, record: LeaseRecord | None, must_exist: bool) -> str | None:
        from botocore.exceptions import ClientError

        try:
            if record is None:
                # Released: overwrite with an expired record, conditionally (a plain delete
                # could remove a lease another run has just taken over).
                record = {"released": True, "expires_at": 0, "token": uuid.uuid4().hex}
            condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                         ContentType="application/json", **condition)
            return out["ETag"]
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):
                raise _Conflict(self.read()) from exc
            raise

    def read(self) -> _Stored:
        from botocore.exceptions import ClientError

        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return _Stored(None, None)
            raise
        return _Stored(json.loads(out["Body"].read()), out["ETag"])


class _Conflict(Exception):
    def __init__(self, current: _Stored) -> None:
        self.current = current


class Lease:
    """``with Lease(root, ttl_s=...) as lease:`` holds the lease for the block, or raises
    ``LeaseHeldError`` naming the holder. ``lease.renew()`` extends it during long work."""

    def __init__(self, root: str, ttl_s: float = 3600.0, name: str = LEASE_NAME, owner: str | None = None) -> None:
        if ttl_s <= 0:
            raise ValueError(f"a lease needs a positive ttl_s, got {ttl_s}")
        self.uri = f"{root.rstrip('/')}/{name}"
        self.ttl_s = ttl_s
        self.owner = owner or f"reindex-{uuid.uuid4().hex[:8]}"
        self._backend = _S3Backend(self.uri) if self.uri.startswith("s3://") else _LocalBackend(self.uri)
        self._version: str | None = None
        self._record: LeaseRecord | None = None

    def _new_record(self) -> LeaseRecord:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "acquired_at": now,
                "expires_at": now + self.ttl_s, "token": uuid.uuid4().hex}

    @property
    def held(self) -> bool:
        return self._record is not None

    def holder(self) -> LeaseRecord | None:
        """The stored record, live or not (None when there is none)."""
        return self._backend.read().record

    def acquire(self) -> None:
        current = self._backend.read()
        if current.record is not None and current.record.get("expires_at", 0) > time.time():
            raise LeaseHeldError(self.uri, current.record)
        record = self._new_record()
        try:  # absent: create; expired or released: replace exactly the version read
            self._version = self._backend.swap(current.version, record, must_exist=current.record is not None)
        except _Conflict as conflict:  # another run got there between our read and write
            raise LeaseHeldError(self.uri, conflict.current.record or {}) from None
        self._record = record

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now; ``LeaseLostError`` if it was taken over."""
        if self._record is None:
            raise LeaseLostError(f"{self.uri}: renew() without holding the lease")
        record = {**self._record, "expires_at": time.time() + self.ttl_s, "token": uuid.uuid4().hex}
        try:
            self._version = self._backend.swap(self._version, record, must_exist=True)
        except _Conflict:
            self._record = None
            raise LeaseLostError(f"{self.uri} was taken over by another run after it expired; "
                                 f"raise the ttl (now {self.ttl_s:.0f} s) above the longest run") from None
        self._record = record

    def release(self) -> None:
        """Give the lease up; a lease already taken over is left to its new holder."""
        if self._record is None:
            return
        try:
            self._backend.swap(self._version, None, must_exist=True)
        except _Conflict:
            pass
        self._record = self._version = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
