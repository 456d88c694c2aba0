"""Helpers of the tests that talk to an endpoint over HTTP on 127.0.0.1: free ports, a
serve config, and JSON requests."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request

import yaml

from tests.pipelines.conftest import FEATURIZE


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on 127.0.0.1: every socket stays bound until all are chosen
    (one at a time, the system may hand out a port it just released again)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_config(path, model: str, index: str, port: int, **serve) -> str:
    settings = {"model": {"path": model, "device": "cpu"}, "featurize": FEATURIZE, "index": {"out": index},
                "serve": {"host": "127.0.0.1", "port": port, "max_image_bytes": 50_000, "max_image_pixels": 1_000_000,
                          "max_k": 20, "partitions": 2, "cpus_per_replica": 0.25, "threads": 1,
                          # concurrent queries wait up to 20 ms to share a batch, so batching is seen even
                          # when a busy machine delivers them one at a time
                          "batch_wait_ms": 20, **serve}}
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def post(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/attributions", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", headers=headers or {}), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
