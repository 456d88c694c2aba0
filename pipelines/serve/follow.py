"""Replicas that serve an index's latest version follow its ``latest`` pointer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("ray.serve")


class FollowLatest:
    """While no version is pinned (``version: null``), look at the index's ``latest`` pointer
    every ``refresh_s`` seconds and call ``swap(user_config)`` when it names another version
    than ``current()``, so that a published reindex reaches the replica without a redeploy.
    A version built with another model is not followed (the featurizer cannot swap models):
    it is logged once, and the endpoint keeps answering from what it holds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task | None = None

    def restart(self, user_config: dict[str, Any], current, fingerprint, swap) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        period = float(user_config.get("refresh_s") or 0)
        if user_config.get("version") is None and period > 0:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(user_config, period, current, fingerprint, swap))

    async def _loop(self, user_config: dict[str, Any], period: float, current, fingerprint, swap) -> None:
        from attribution_core.index.store import IndexStore

        store = IndexStore(user_config["index"])
        refused: set[str] = set()
        while True:
            await asyncio.sleep(period)
            try:
                latest = await asyncio.to_thread(store.latest_version)
                if latest is None or latest == current() or latest in refused:
                    continue
                manifest = await asyncio.to_thread(store.manifest, latest)
                if manifest["model"]["fingerprint"] != fingerprint():
                    refused.add(latest)
                    log.error("%s: %s's latest is now %s, built with another model (%s); not following it. "
                              "Redeploy the endpoint with that model.", self.name, store.uri, latest,
                              manifest["model"].get("path"))
                    continue
                log.info("%s: %s's latest moved to %s; swapping", self.name, store.uri, latest)
                await swap(user_config)
            except asyncio.CancelledError:
                raise
            except Exception:  # storage hiccup or a bad version: keep serving, try at the next tick
                log.exception("%s: following %s's latest failed; still serving %s", self.name, store.uri, current())
