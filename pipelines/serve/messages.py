"""What the endpoint's deployments pass each other, and their settings: the served version
each deployment's ``user_config`` carries (``ServedVersion``), the model a featurizing
replica loads (``QueryModel``), the ingress's requests to the featurizer (``FeaturizeItem``
-> ``QueryFeature``) and to every searcher partition (``SearchItem`` -> ``PartitionAnswer``),
or a ``Refusal`` with the HTTP status, and the featurizer's cache. No Ray here."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import threading
from typing import Any

import numpy as np

from attribution_core.answers import Hit
from attribution_core.config_io import check, from_mapping
from attribution_core.config_serve import SEARCH_MODES
from attribution_core.errors import RequestError


@dataclasses.dataclass(frozen=True)
class ServedVersion:
    """What a running endpoint swaps without new replicas: each Serve deployment's
    ``user_config``, sent as a plain mapping and rebuilt with ``from_mapping`` on arrival.
    Redeploying with only these changed is a lightweight update (``reconfigure``)."""

    index: str
    """Index root (path or s3://) whose version is served."""
    version: str | None = None
    """Version served; None follows the index's ``latest`` pointer every ``refresh_s``."""
    weights: str | None = None
    """Weights artifact URI; None: <index>/versions/<v>/weights/<weights_name>.json, else the
    nearest earlier version's."""
    weights_name: str = "learned"
    """Weights artifact name under the served version (serve.weights)."""
    max_batch_size: int = 8
    """Concurrent queries featurized / searched together (serve.max_batch_size)."""
    batch_wait_ms: float = 0.0
    """Milliseconds a replica waits to fill a batch (serve.batch_wait_ms)."""
    refresh_s: float = 0.0
    """Seconds between looks at ``latest`` while no version is pinned; 0 = never (serve.refresh_s)."""
    search: str = "auto"
    """Exact scan or approximate search with exact rescoring (serve.search)."""
    candidates: int = 0
    """Rows an approximate query rescores; 0 = the version's (serve.search_candidates)."""
    rows_dir: str | None = None
    """Where approximate searchers keep the rows they rescore from (serve.rows_dir)."""

    def __post_init__(self) -> None:
        check(self.search in SEARCH_MODES, "user_config.search", f"choose one of {', '.join(SEARCH_MODES)}")
        check(self.candidates >= 0, "user_config.candidates", "must be >= 0 (0 = the version's)")
        check(self.max_batch_size >= 1, "user_config.max_batch_size", "must be at least 1")
        check(self.batch_wait_ms >= 0, "user_config.batch_wait_ms", "must be >= 0")
        check(self.refresh_s >= 0, "user_config.refresh_s", "must be >= 0 (0 = do not follow latest)")


def served_version(user_config: dict[str, Any]) -> ServedVersion:
    """The typed form of a deployment's ``user_config`` (refused by field name when wrong)."""
    return from_mapping(ServedVersion, user_config, "user_config")


def batch_settings(method: Any, served: ServedVersion) -> None:
    """Apply ``served``'s batching to a ``serve.batch`` method."""
    method.set_max_batch_size(served.max_batch_size)
    method.set_batch_wait_timeout_s(served.batch_wait_ms / 1000)


class FeatureCache:
    """A featurizer replica's query features by content: the image's bytes, prompt, label and
    contrast aspect under one feature spec determine the features exactly (timesteps and noise
    are seeded by the image's content), so a repeated query need not be featurized again.
    Least recently used first out, ``size`` entries (0 keeps none); safe across threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: collections.OrderedDict[str, QueryFeature] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(spec: str, item: FeaturizeItem) -> str:
        digest = hashlib.blake2b(item.image, digest_size=16)
        for part in (item.prompt, item.label, item.contrast_aspect):
            digest.update(b"\x00" + repr(part).encode())
        return f"{spec}:{digest.hexdigest()}"

    def get(self, key: str) -> QueryFeature | None:
        with self.lock:
            found = self.entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: str, value: QueryFeature) -> None:
        if self.size < 1:
            return
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A request a deployment refuses, sent back as a value so one item of a batch fails
    alone: the HTTP status and what to change (``error()`` raises it at the ingress).
    ``held``: the index states the refusing searcher holds (empty from the featurizer)."""

    status: int
    detail: str
    held: tuple[str, ...] = ()

    @classmethod
    def of(cls, exc: RequestError, held: tuple[str, ...] = ()) -> Refusal:
        return cls(exc.status, exc.detail, held)

    def error(self) -> RequestError:
        return RequestError(self.status, self.detail)


@dataclasses.dataclass(frozen=True)
class FeaturizeItem:
    """Ingress -> featurizer: a checked query image to featurize (``contrast_aspect``: its
    prompt is contrasted with the prompt without that aspect, Concept-TRAK's query)."""

    image: bytes
    prompt: str | None
    label: str | int | None
    contrast_aspect: str | None = None


@dataclasses.dataclass(frozen=True)
class QueryFeature:
    """Featurizer -> ingress: a query's features under the served version's feature spec."""

    features: np.ndarray
    """``[k_total]`` float32, the index's feature layout."""
    spec: str
    """``FeatureSpec.key()`` the features were computed under (searchers refuse another)."""
    query_id: str
    featurize_ms: float
    batch: int
    """Queries featurized together with this one; 0 when it came from the cache."""
    cached: bool = False


@dataclasses.dataclass(frozen=True)
class SearchItem:
    """Ingress -> every searcher partition: a query feature, the weightings to search it
    under, and the state to answer from (None: the current one)."""

    features: np.ndarray
    spec: str
    aspects: tuple[str, ...]
    k: int
    fallback: bool
    """The client named no aspects: an aspect without learned weights falls back to uniform."""
    key: str | None = None


@dataclasses.dataclass(frozen=True)
class PartitionAnswer:
    """A searcher partition -> ingress: its own top-k per asked aspect, and which state and
    weighting answered."""

    key: str
    version: str
    held: tuple[str, ...]
    search_ms: float
    batch: int
    resolved: dict[str, str]
    """Asked aspect -> the weighting that answered it."""
    results: dict[str, list[Hit]]


def replica_threads(requested: int) -> int:
    """torch / FAISS threads of a replica: ``requested``, 0 = the machine's CPUs."""
    return requested or os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class QueryModel:
    """What a replica that featurizes queries loads: the config file (the model's device and
    base, ``serve`` settings), the model directory (None: the config's ``model.path``), torch
    threads per replica (``serve.threads``) and the base pipeline of a LoRA."""

    config_path: str
    model_dir: str | None
    threads: int
    base: str | None = None
