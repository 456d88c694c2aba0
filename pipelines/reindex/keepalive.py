"""Keeping a held lease alive through a long run, and refusing to go on once it is lost."""

from __future__ import annotations

import logging
import threading

from pipelines.reindex.lease import Lease, LeaseLostError

log = logging.getLogger(__name__)


class KeepAlive:
    """Renews a held lease every third of its ttl from a daemon thread; ``check()`` renews
    once more and raises ``LeaseLostError`` if the lease was taken over meanwhile."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost: LeaseLostError | None = None
        self._thread = threading.Thread(target=self._run, name="reindex-lease", daemon=True)

    def __enter__(self) -> KeepAlive:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                self.check()
            except LeaseLostError:
                log.error("the reindex lease %s was lost; this run will not publish", self.lease.uri)
                return
            except Exception:  # storage hiccup: try again at the next tick, the ttl leaves room
                log.warning("renewing the reindex lease %s failed; retrying", self.lease.uri, exc_info=True)

    def check(self) -> None:
        with self._lock:
            if self._lost is not None:
                raise self._lost
            try:
                self.lease.renew()
            except LeaseLostError as exc:
                self._lost = exc
                raise
