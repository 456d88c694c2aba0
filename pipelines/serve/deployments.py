"""The Serve deployments: a featurizer holding the model, index searchers holding rows.

Both batch concurrent requests (``serve.batch``) and run the work in a thread so the
replica's event loop keeps answering health checks and ``reconfigure``. ``reconfigure``
takes a ``ServedVersion`` mapping (index, version, weights, ...): a new index version or new
weights are loaded next to the current ones and swapped in when ready; requests already
running finish on the state they started with, and searchers keep the previous state so
partitions that swap at different moments still answer one consistent version. With no
version pinned, both also follow the index's ``latest`` pointer (``FollowLatest``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import numpy as np
import torch
from ray import serve

from attribution_core.errors import MissingWeightsError
from attribution_core.index.approximate import RESCORING_THREADS, set_threads
from attribution_core.weights.served import PartitionInfo, ServedIndex
from pipelines.serve.featurize import QueryFeatures
from pipelines.serve.follow import FollowLatest
from pipelines.serve.messages import (FeaturizeItem, PartitionAnswer, QueryFeature, QueryModel, Refusal, SearchItem,
                                      ServedVersion, batch_settings, replica_threads, served_version)

log = logging.getLogger("ray.serve")

PREVIOUS_GRACE_S = 120.0  # how long a searcher keeps the state it swapped out
# How often a stopping replica looks for requests still running. An idle replica also sleeps
# this long before its first look, so Serve's default (2 s) held every stop, and each replica
# a swap replaces, 2 s; a look is a counter read.
DRAIN_CHECK_S = 0.25


class SearcherInfo(PartitionInfo):
    held: list[str]
    """The states the searcher holds: its current one, and the one it swapped out while kept."""


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30,
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)
class QueryFeaturizer:
    """Holds the model (``QueryFeatures``) in its own replicas (``serve.featurize_in:
    replicas``): featurizes query images with the served index's own featurize settings
    (GPU when the replica has one)."""

    def __init__(self, model: QueryModel) -> None:
        self.features = QueryFeatures(model, "featurizer")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self.features.reconfigure(user_config, self.featurize)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def featurize(self, items: list[FeaturizeItem]) -> list[QueryFeature | Refusal]:
        return await self.features.featurize_async(items)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30,
                  graceful_shutdown_wait_loop_s=DRAIN_CHECK_S)
class IndexSearcher:
    """Holds partition ``part`` of ``parts`` of an index version and answers top-k with exact
    scores for preconditioned, weighted queries (``ServedIndex.search``: an exact scan, or
    approximate candidates rescored exactly, by ``serve.search``)."""

    def __init__(self, part: int, parts: int, threads: int) -> None:
        self.part, self.parts, self.threads = part, parts, replica_threads(threads)
        torch.set_num_threads(self.threads)
        set_threads(self.threads)
        self.current = None  # ServedIndex
        self.previous = None
        self._loading = asyncio.Lock()
        self.follow = FollowLatest(f"searcher {part}/{parts}")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        served = served_version(user_config)
        batch_settings(self.search, served)
        await self._swap(served)
        self.follow.restart(served, lambda: self.current.version,
                            lambda: self.current.manifest.model.fingerprint, self._swap)

    async def _swap(self, served: ServedVersion) -> None:
        async with self._loading:
            loaded = await asyncio.to_thread(functools.partial(
                ServedIndex.load, served.index, version=served.version, weights_uri=served.weights,
                weights_name=served.weights_name, part=self.part, parts=self.parts, device="cpu", search=served.search,
                candidates=served.candidates, rows_dir=served.rows_dir, threads=self.threads))
            if (self.current is not None and loaded.key == self.current.key
                    and loaded.search_index.kernel == self.current.search_index.kernel):
                return
            torch.set_num_threads(RESCORING_THREADS if loaded.search_mode == "approximate" else self.threads)
            self.previous, self.current = self.current, loaded  # one assignment: requests see old or new
            if self.previous is not None:  # kept while other partitions may still answer from it
                key = self.previous.key
                asyncio.get_running_loop().call_later(PREVIOUS_GRACE_S, self._drop_previous, key)
            log.info("searcher %(part)d/%(parts)d now serves %(key)s (%(rows)d rows, %(mode)s search %(kernel)s, "
                     "loaded in %(seconds).1f s)", {
                         "part": self.part, "parts": self.parts, "key": loaded.key, "rows": len(loaded.example_ids),
                         "mode": loaded.search_mode, "kernel": loaded.search_index.kernel,
                         "seconds": loaded.load_seconds})

    def _drop_previous(self, key: str) -> None:
        if self.previous is not None and self.previous.key == key:
            self.previous = None  # frees its rows

    def info(self) -> SearcherInfo:
        return SearcherInfo(**self.current.info(), held=list(self._held()))

    def _held(self) -> tuple[str, ...]:
        return tuple(s.key for s in (self.current, self.previous) if s is not None)

    def _state(self, key: str | None) -> ServedIndex | None:
        for state in (self.current, self.previous):
            if state is not None and (key is None or state.key == key):
                return state
        return None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def search(self, items: list[SearchItem]) -> list[PartitionAnswer | Refusal]:
        return await asyncio.to_thread(self._search, items)

    def _search(self, items: list[SearchItem]) -> list[PartitionAnswer | Refusal]:
        out: list[PartitionAnswer | Refusal | None] = [None] * len(items)
        resolved: dict[int, dict[str, str]] = {}
        by_state: dict[int, tuple[ServedIndex, list[int], list[list[str]]]] = {}
        held = self._held()
        for i, item in enumerate(items):
            state = self._state(item.key)
            if state is None:
                out[i] = Refusal(503, f"index state {item.key} is no longer held; retry", held)
                continue
            if state.feature_spec != item.spec:
                out[i] = Refusal(503, (
                    f"the featurizer's feature spec ({item.spec}) differs from index version {state.version}'s "
                    f"({state.feature_spec}): model and index are being swapped, or were deployed apart; retry"), held)
                continue
            try:
                resolved[i] = state.resolve_aspects(item.aspects, item.fallback)
            except MissingWeightsError as exc:
                out[i] = Refusal(409, str(exc), held)
                continue
            entry = by_state.setdefault(id(state), (state, [], []))
            entry[1].append(i)
            entry[2].append(sorted(set(resolved[i].values())))
        for state, rows, weightings in by_state.values():
            started = time.perf_counter()
            try:
                features = torch.from_numpy(np.stack([items[i].features for i in rows]))
                found = state.search(features, weightings, [items[i].k for i in rows])
            except Exception as exc:  # keep the replica serving whatever one batch did
                log.exception("search of a batch of %d failed", len(rows))
                for i in rows:
                    out[i] = Refusal(500, f"search failed: {exc}", held)
                continue
            elapsed = (time.perf_counter() - started) * 1000
            for i, result in zip(rows, found):
                out[i] = PartitionAnswer(key=state.key, version=state.version, held=held, search_ms=elapsed,
                                         batch=len(rows), resolved=resolved[i],
                                         results={asked: result[used] for asked, used in resolved[i].items()})
        return out
