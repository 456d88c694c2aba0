"""An index version as a query service holds it: one partition of the rows, searched exactly
(packed in memory) or approximately (codes in memory, rows in a mapped file, candidates
rescored exactly), the kernel, and the weights of every aspect it can answer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.answers import UNIFORM, Hit
from attribution_core.data.storage import filesystem_for
from attribution_core.errors import ConfigError, ManifestMismatchError, MissingWeightsError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.approximate import RescoredSearch
from attribution_core.index.approximate_files import partition_index
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.opening import open_version
from attribution_core.index.reader import load_index, metadata_of, version_shards
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.index.search import SearchIndex
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import (WeightsDocument, check_weights, find_weights, unvalidated_choice,
                                               weights_matrix)


def read_weights_uri(uri: str) -> WeightsDocument:
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError) as exc:
        raise ManifestMismatchError(f"no weights artifact at {uri!r}; write one with `attribution learn-weights`") from exc


def search_mode(search: str, manifest: IndexManifest, uri: str) -> str:
    """'exact' or 'approximate' for ``serve.search`` and a version (which may carry an
    approximate index, ``index.approximate``)."""
    has = manifest.approximate is not None
    if search == "exact" or (search == "auto" and not has):
        return "exact"
    if search in ("auto", "approximate") and has:
        return "approximate"
    if search == "approximate":
        raise ConfigError(f"index version {manifest.version} at {uri} has no approximate index (it had fewer "
                          f"rows than index.approximate.min_rows, or index.approximate.build was 'never'); "
                          "rebuild it with index.approximate.build: always, or serve it with serve.search: exact")
    raise ConfigError(f"serve.search must be auto, exact or approximate, got {search!r}")


class PartitionInfo(TypedDict):
    """What a searcher partition says of the state it serves (``GET /v1/index`` is made from it)."""

    uri: str
    version: str
    key: str
    """The state's key: the version and its weights (``v<seq>-...``)."""
    rows: int
    partition_rows: int
    part: int
    parts: int
    groups: list[str]
    aspects: list[str]
    weights: dict[str, Any] | None
    answered_by: dict[str, dict[str, Any]]
    kernel: str
    search: str
    search_kernel: str
    search_bytes_per_row: float
    feature_spec: str
    model_fingerprint: str
    created_at: str
    load_seconds: float


@dataclasses.dataclass
class ServedIndex:
    uri: str
    manifest: IndexManifest
    layout: GroupLayout
    kernel: list[tuple[int, int, torch.Tensor]]
    weights: WeightsDocument | None
    weights_source: str | None
    weights_name: str
    example_ids: list[str]
    uris: list[str]
    captions: list[str | None]
    search_index: SearchIndex | RescoredSearch
    part: int
    parts: int
    load_seconds: float
    search_mode: str = "exact"
    metadata: list[str | None] | None = None  # kept columns per row (JSON objects), None when none are kept

    @classmethod
    def load(cls, uri: str, *, version: str | None = None, weights_uri: str | None = None,
             weights_name: str = "learned", part: int = 0, parts: int = 1, device: str = "cpu", search: str = "auto",
             candidates: int = 0, rows_dir: str | None = None, threads: int = 1) -> ServedIndex:
        """Version ``version`` (default: latest) of the index at ``uri``, partition ``part`` of
        ``parts``. Weights: ``weights_uri`` if given (same feature spec and groups required),
        else ``<uri>/versions/<v>/weights/<weights_name>.json`` or that of the nearest earlier
        version with the same feature spec; none is fine (only 'uniform' is answered then).
        ``search`` (``serve.search``): 'exact', 'approximate' (the version's approximate index,
        ``candidates`` overriding its setting when non-zero, rows rescored from a
        file in ``rows_dir``, its scan spread over ``threads`` cores) or 'auto' (approximate when
        the version has one)."""
        started = time.perf_counter()
        store = IndexStore(uri)
        manifest = open_version(store, version)
        mode = search_mode(search, manifest, uri)
        if mode == "exact":
            loaded = load_index(uri, version=manifest.version, part=part, parts=parts, dtype=np.float16)
            search_index = SearchIndex(loaded.features, device=device)  # float16 rows as stored, packed
        else:
            loaded = load_index(uri, version=manifest.version, part=part, parts=parts, dtype=np.float16,
                                rows_dir=rows_dir or tempfile.gettempdir())
            codes = partition_index(store, manifest.approximate, version_shards(manifest, part, parts),
                                    loaded.layout.k_total, candidates=candidates)
            search_index = RescoredSearch(codes, loaded.features, threads)
        if weights_uri:
            weights = read_weights_uri(weights_uri)
            check_weights(weights, loaded.manifest, same_version=False)
            source = weights_uri
        else:
            weights = find_weights(store, loaded.manifest, weights_name)
            source = (f"{uri.rstrip('/')}/versions/{weights['index']['version']}/weights/{weights_name}.json"
                      if weights else None)
        return cls(uri=uri, manifest=loaded.manifest, layout=loaded.layout, kernel=loaded.kernel, weights=weights,
                   weights_source=source, weights_name=weights_name, example_ids=loaded.example_ids, uris=loaded.uris,
                   captions=loaded.captions, metadata=loaded.metadata, search_index=search_index, part=part, parts=parts,
                   load_seconds=round(time.perf_counter() - started, 3), search_mode=mode)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def feature_spec(self) -> str:
        return self.manifest.spec.key()

    @property
    def key(self) -> str:
        """Identity of what answers: index version + weights. Partitions agree on it."""
        w = hashlib.blake2b(json.dumps(self.weights.get("aspects") if self.weights else None, sort_keys=True).encode(),
                            digest_size=6).hexdigest()
        return f"{self.version}+{w}"

    @property
    def aspects(self) -> list[str]:
        return [*(self.weights["aspects"] if self.weights else []), UNIFORM]

    def resolve_aspects(self, aspects: tuple[str, ...], fallback_uniform: bool) -> dict[str, str]:
        """Requested aspect -> the weighting that answers it: the one measured best for it
        (``answered_by`` in the artifact, see ``weights.choice``; for an artifact without a
        recorded choice, the aspect's own weights, and uniform for 'general'). Without
        learned weights for an aspect: 'uniform' when the client did not choose aspects, else
        ``MissingWeightsError``."""
        have = set(self.aspects)
        missing = [a for a in aspects if a not in have]
        if missing and not fallback_uniform:
            name = self.weights_source or f"{self.uri.rstrip('/')}/versions/{self.version}/weights/{self.weights_name}.json"
            raise MissingWeightsError(
                f"index version {self.version} has no learned weights for aspect(s) {', '.join(missing)} "
                f"(looked for {name}); create them with `attribution learn-weights --config <config> --index "
                f"{self.uri} --version {self.version} --aspects {','.join(missing)}`, or ask for 'uniform'", missing)
        return {a: (self.answered_by(a) if a in have else UNIFORM) for a in aspects}

    def answered_by(self, aspect: str) -> str:
        learned = (self.weights or {}).get("aspects", {}).get(aspect, {})
        chosen = learned.get("answered_by", unvalidated_choice(aspect))
        return chosen if chosen in self.aspects else aspect

    def choices(self) -> dict[str, dict[str, Any]]:
        """Per learned aspect: the weighting that answers it and the evidence it was chosen by."""
        return {a: {"answered_by": self.answered_by(a), "by": (w.get("choice") or {}).get("by", "unvalidated")}
                for a, w in ((self.weights or {}).get("aspects") or {}).items()}

    def search(self, features: torch.Tensor, weightings: list[list[str]], ks: list[int]) -> list[dict[str, list[Hit]]]:
        """Top-k rows of this partition for each query ``features[i]`` under each weighting
        in ``weightings[i]`` (names from ``resolve_aspects``), ``ks[i]`` rows each."""
        names = sorted({w for ws in weightings for w in ws})
        matrix = weights_matrix(self.weights or {"groups": list(self.layout.group_names), "aspects": {}}, names)
        wq = preconditioned_queries(features, matrix, self.layout, self.kernel)  # [A, Q, D]
        pairs = [(names.index(w), q) for q, ws in enumerate(weightings) for w in ws]
        rows = torch.stack([wq[a, q] for a, q in pairs]) if pairs else torch.empty(0, self.layout.k_total)
        k_max = max(ks) if ks else 1
        scores, idx = self.search_index.topk(rows, k_max)  # [P, k]
        out: list[dict[str, list[Hit]]] = [{} for _ in weightings]
        for p, (a, q) in enumerate(pairs):
            k = min(ks[q], scores.shape[1])
            out[q][names[a]] = [Hit(example_id=self.example_ids[j], score=float(s), uri=self.uris[j],
                                    caption=self.captions[j] or "", metadata=metadata_of(self.metadata, j))
                                for s, j in zip(scores[p, :k].tolist(), idx[p, :k].tolist())]
        return out

    def info(self) -> PartitionInfo:
        return {
            "uri": self.uri, "version": self.version, "key": self.key, "rows": self.manifest.rows,
            "partition_rows": len(self.example_ids), "part": self.part, "parts": self.parts,
            "groups": list(self.layout.group_names), "aspects": self.aspects,
            "weights": ({"source": self.weights_source, "learned_on": self.weights["index"]["version"]}
                        if self.weights else None),
            "answered_by": self.choices(),
            "kernel": self.manifest.stats["kernel"], "search": self.search_mode,
            "search_kernel": self.search_index.kernel, "search_bytes_per_row": self.search_index.bytes_per_row,
            "feature_spec": self.feature_spec, "model_fingerprint": self.manifest.model.fingerprint,
            "created_at": self.manifest.created_at, "load_seconds": self.load_seconds,
        }
