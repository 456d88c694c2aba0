"""Replicas that serve an index's latest version follow its ``latest`` pointer."""

from __future__ import annotations

import asyncio
import logging

from attribution_core.index.store import IndexStore
from pipelines.serve.messages import ServedVersion

log = logging.getLogger("ray.serve")


class FollowLatest:
    """While no version is pinned (``version: null``), look at the index's ``latest`` pointer
    every ``refresh_s`` seconds and call ``swap(served)`` when it names another version
    than ``current()``, so that a published reindex reaches the replica without a redeploy.
    A version built with another model is not followed (the featurizer cannot swap models):
    it is logged once, and the endpoint keeps answering from what it holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task | None = None

    def restart(self, served: ServedVersion, current, fingerprint, swap) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if served.version is None and served.refresh_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop(served, current, fingerprint, swap))

    async def _loop(self, served: ServedVersion, current, fingerprint, swap) -> None:
        store = IndexStore(served.index)
        period = served.refresh_s
        refused: set[str] = set()
        while True:
            await asyncio.sleep(period)
            try:
                latest = await asyncio.to_thread(store.latest_version)
                if latest is None or latest == current() or latest in refused:
                    continue
                manifest = await asyncio.to_thread(store.manifest, latest)
                if manifest.model.fingerprint != fingerprint():
                    refused.add(latest)
                    log.error("%s: %s's latest is now %s, built with another model (%s); not following it. "
                              "Redeploy the endpoint with that model.", self.name, store.uri, latest,
                              manifest.model.path)
                    continue
                log.info("%s: %s's latest moved to %s; swapping", self.name, store.uri, latest)
                await swap(served)
            except asyncio.CancelledError:
                raise
            except Exception:  # storage hiccup or a bad version: keep serving, try at the next tick
                log.exception("%s: following %s's latest failed; still serving %s", self.name, store.uri, current())
