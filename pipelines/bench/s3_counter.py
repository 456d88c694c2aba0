"""A counting proxy in front of an S3-protocol endpoint: every request is forwarded as it
is, and the bytes of the responses to reads (GET) under a key prefix are counted. Pointing
``AWS_ENDPOINT_URL`` at it measures what a job really transferred from the bucket, whatever
process or library read it."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class CountingProxy:
    """``with CountingProxy(upstream) as proxy``: ``proxy.url`` forwards to ``upstream``;
    ``proxy.read_bytes(prefix)`` is the body bytes of GET responses for paths under
    ``/<prefix>`` (path-style addressing: ``/bucket/key``)."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self._host, self._port = parsed.hostname, parsed.port or 80
        self._lock = threading.Lock()
        self._reads: list[tuple[str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(proxy._host, proxy._port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status, response.reason)
                head = self.command == "HEAD"  # a HEAD answer keeps the object's Content-Length
                for k, v in response.getheaders():
                    if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                if self.command == "GET":
                    with proxy._lock:
                        proxy._reads.append((self.path, len(payload)))

            def _body(self) -> bytes | None:
                """The request body, by Content-Length or in chunks (Transfer-Encoding: chunked)."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def read_bytes(self, prefix: str) -> int:
        """GET body bytes under ``/<prefix>`` since the last ``reset``."""
        want = "/" + prefix.strip("/") + "/"
        with self._lock:
            return sum(n for path, n in self._reads if urlparse(path).path.startswith(want))

    def reset(self) -> None:
        with self._lock:
            self._reads.clear()

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
