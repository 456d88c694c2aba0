"""A query featurizer's state: the model, the served version's featurize settings, the
feature cache, and the batch step that turns checked queries into features.

It lives in a ``QueryFeaturizer`` replica (``serve.featurize_in: replicas``) or in the HTTP
ingress itself (``ingress``: one hop less per request); either way the same code featurizes
with the served index's own settings, through the same ``featurize`` code as the index job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch

from attribution_core.config import ProjectConfig
from attribution_core.data.captions import without_concept
from attribution_core.data.images import ImageDecodeError
from attribution_core.errors import InputError
from attribution_core.features.query import query_batch
from attribution_core.index.opening import open_for_model
from attribution_core.index.store import IndexStore
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.fingerprint import model_fingerprint
from pipelines.models import load_model_dir
from pipelines.output import quiet_libraries
from pipelines.serve.follow import FollowLatest
from pipelines.serve.messages import (FeatureCache, FeaturizeItem, QueryFeature, QueryModel, Refusal, ServedVersion,
                                      batch_settings, replica_threads, served_version)

log = logging.getLogger("ray.serve")


class QueryFeatures:
    """Holds the model (GPU when the process has one) and featurizes query images with the
    served version's feature spec. ``load`` (re)opens a version: the model's fingerprint is
    checked against it, and featurizers for a spec already seen are kept."""

    def __init__(self, model: QueryModel, name: str) -> None:
        quiet_libraries()
        torch.set_num_threads(replica_threads(model.threads))
        self.cfg = ProjectConfig.load(model.config_path)
        self.model_dir = model.model_dir or self.cfg.model.path
        self.adapter = load_model_dir(self.model_dir, self.cfg.model.device, model.base or self.cfg.model.base)
        self.fingerprint = model_fingerprint(self.adapter)
        self.featurizers: dict[str, Any] = {}  # feature spec key -> Featurizer
        self.cache = FeatureCache(self.cfg.serve.feature_cache)
        self.spec: str | None = None
        self.version: str | None = None
        self.follow = FollowLatest(name)

    async def reconfigure(self, user_config: dict[str, Any], batched: Any) -> None:
        """A deployment's ``reconfigure``: load the version its ``user_config`` names, apply
        its batching to the deployment's ``serve.batch`` method ``batched``, and follow the
        index's ``latest`` while no version is pinned."""
        served = served_version(user_config)
        batch_settings(batched, served)
        await self._swap(served)
        self.follow.restart(served, lambda: self.version, lambda: self.fingerprint, self._swap)

    async def _swap(self, served: ServedVersion) -> None:
        await asyncio.to_thread(self.load, served)

    async def featurize_async(self, items: list[FeaturizeItem]) -> list[QueryFeature | Refusal]:
        """``featurize`` in a thread, so the replica's event loop keeps answering."""
        return await asyncio.to_thread(self.featurize, items)

    def load(self, served: ServedVersion) -> None:
        manifest, _ = open_for_model(IndexStore(served.index), served.version, self.adapter,
                                     self.model_dir, max_rows_per_pass=self.cfg.featurize.max_rows_per_pass, fingerprint=self.fingerprint,
                                     cache=self.featurizers)
        self.spec, self.version = manifest.spec.key(), manifest.version

    def featurize(self, items: list[FeaturizeItem]) -> list[QueryFeature | Refusal]:
        """Each item's features, from the cache or computed (plain and contrastive queries in
        their own batches), or its ``Refusal``: a bad image fails only its own item."""
        spec = self.spec
        featurizer = self.featurizers[spec]
        vocabulary = {a: list(p.values) for a, p in self.cfg.weights.prompts.items()}
        out: list[QueryFeature | Refusal | None] = [None] * len(items)
        groups: dict[bool, tuple[list[int], list[Any]]] = {False: ([], []), True: ([], [])}  # contrastive?
        keys = [FeatureCache.key(spec, item) for item in items]
        for i, item in enumerate(items):  # decode one by one: a bad image fails only its own request
            cached = self.cache.get(keys[i])
            if cached is not None:
                out[i] = dataclasses.replace(cached, featurize_ms=0.0, batch=0, cached=True)
                continue
            try:
                aspect = item.contrast_aspect
                contrast = ([without_concept(item.prompt or "", aspect, vocabulary, self.adapter.caption_template)]
                            if aspect else None)
                one = query_batch(self.adapter, [item.image], prompts=[item.prompt], labels=[item.label],
                                  contrast=contrast)
            except InputError as exc:
                out[i] = Refusal(400 if isinstance(exc, ImageDecodeError) else 422, str(exc))
                continue
            groups[contrast is not None][0].append(i)
            groups[contrast is not None][1].append(one)
        for good, batches in groups.values():  # plain and contrastive queries featurize apart
            if good:
                self._featurize_group(featurizer, spec, good, batches, out=out)
                for i in good:
                    if isinstance(out[i], QueryFeature):
                        self.cache.put(keys[i], out[i])
        return out

    def _featurize_group(self, featurizer: Any, spec: str, good: list[int], batches: list[Any],
                         *, out: list[QueryFeature | Refusal | None]) -> None:
        first = batches[0]
        batch = ExampleBatch(
            example_ids=tuple(i for b in batches for i in b.example_ids),
            pixels=torch.cat([b.pixels for b in batches]),
            captions=tuple(c for b in batches for c in b.captions) if first.captions is not None else None,
            labels=torch.cat([b.labels for b in batches]) if first.labels is not None else None,
            contrast_captions=(tuple(c for b in batches for c in b.contrast_captions)
                               if first.contrast_captions is not None else None))
        started = time.perf_counter()
        try:
            features = featurizer.flat(batch)
        except Exception as exc:  # a model failure must not take the replica down
            log.exception("featurizing a batch of %d failed", len(good))
            for i in good:
                out[i] = Refusal(500, f"featurizing failed: {exc}")
            return
        elapsed = (time.perf_counter() - started) * 1000
        for row, i in enumerate(good):
            out[i] = QueryFeature(features=features[row].numpy().astype(np.float32), spec=spec,
                                  query_id=batch.example_ids[row], featurize_ms=elapsed, batch=len(good))
