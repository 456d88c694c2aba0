"""``attribution reindex``: the one command a scheduler runs to keep the index current.

Under a lease on the index root (a second, overlapping run exits at once and says who holds
it): incremental index of the dataset (only new and changed examples are featurized; the
stats pass runs as part of it) into a new version that is committed but not yet published,
then weights (learned again when ``reindex.relearn`` says so), then publish: ``latest`` moves
to the new version. Endpoints that serve the latest version (no version pinned) hot-swap to
it within ``serve.refresh_s``; with ``reindex.endpoint`` the run waits until one does.

Every step is idempotent: a run that stopped anywhere is finished by the next one (the
committed version is found again, learned weights are reused), and a run with nothing new
changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, TypedDict

from attribution_core.config import ProjectConfig
from attribution_core.config_stages import ReindexConfig
from attribution_core.errors import EndpointTimeoutError
from attribution_core.index.manifest import IndexManifest
from attribution_core.index.store import IndexStore
from attribution_core.timing import Stopwatch
from attribution_core.weights.artifact import artifact_path, find_weights
from pipelines.index.job import IndexRequest, run_index
from pipelines.index.scan import shard_keys
from pipelines.reindex.keepalive import KeepAlive
from pipelines.reindex.lease import Lease, LeaseHeldError
from pipelines.serve.runner import wait_ready
from pipelines.steps import ensure_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReindexRequest:
    dataset: str | None = None  # default: data.uri of the config
    model: str | None = None  # default: model.path of the config
    base: str | None = None  # default: model.base of the config
    index: str | None = None  # default: index.out of the config
    ray_address: str | None = None
    full: bool = False  # featurize every example again (a new model, or a first build from scratch)
    owner: str | None = None  # names this run in the lease (default: host, pid, a random token)


class Changes(TypedDict):
    """Rows added / changed / removed between two versions, and their share of the older one's."""

    rows_added: int
    rows_changed: int
    rows_removed: int
    changed_fraction: float


class ChangesSince(Changes):
    since: str
    """The older version."""


class WeightsDecision(TypedDict, total=False):
    """Whether this run learned weights for the new version, where they are, and why."""

    learned: bool
    artifact: str
    learned_on: str | None
    reason: str
    seconds: float | None
    changed_since_learned: ChangesSince | None


class EndpointSwap(TypedDict):
    url: str
    serving: str
    swapped_after_s: float


class ReindexSummary(TypedDict, total=False):
    """What ``reindex`` returns and ``attribution reindex --json`` prints. ``status``:
    published, up_to_date, or skipped (another run holds the lease: ``reason``, ``holder``).
    Otherwise the versions before and after, the rows and the changes between them, the
    weights decision (``weights``), the index job's stage seconds and what it featurized, and
    (``reindex.endpoint``) when the endpoint answered from the new version (``endpoint``)."""

    status: str
    index: str
    reason: str
    holder: dict[str, Any] | None
    version_before: str | None
    version_after: str
    rows: int
    errors: int
    rows_added: int
    rows_changed: int
    rows_removed: int
    changed_fraction: float
    weights: WeightsDecision
    index_stage_seconds: dict[str, float]
    featurized: int
    mode: str | None
    endpoint: EndpointSwap
    stage_seconds: dict[str, float]
    seconds: float


def reindex(cfg: ProjectConfig, req: ReindexRequest) -> ReindexSummary:
    """Run one scheduled update; returns the summary (``status``: published, up_to_date or
    skipped when another run holds the lease)."""
    started = time.perf_counter()
    stages = Stopwatch()
    root = req.index or cfg.index.out
    store = IndexStore(root)
    lease = Lease(root, ttl_s=cfg.reindex.lease_ttl_s, owner=req.owner)
    try:
        lease.acquire()
    except LeaseHeldError as exc:
        log.warning("%s", exc)
        return {"status": "skipped", "index": store.uri, "reason": str(exc), "holder": exc.holder,
                "seconds": round(time.perf_counter() - started, 3)}
    stages.lap("lease")
    try:
        with KeepAlive(lease) as keepalive:
            summary = _update(cfg, req, store, root, stages=stages, keepalive=keepalive)
    finally:
        lease.release()
    summary["stage_seconds"] = stages.seconds
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def _update(cfg: ProjectConfig, req: ReindexRequest, store: IndexStore, root: str, *, stages: Stopwatch,
            keepalive: KeepAlive) -> ReindexSummary:
    before = store.latest()
    before_version = before.version if before else None
    built = run_index(cfg, IndexRequest(dataset=req.dataset or cfg.data.uri, model=req.model or cfg.model.path,
                                        out=root, mode="full" if req.full else "auto", base=req.base or cfg.model.base,
                                        ray_address=req.ray_address, publish=False))
    version = built["version"]
    manifest = store.manifest(version)
    stages.lap("index")
    changes = _changes(before, manifest)
    weights = _weights(cfg, req, store, root, manifest=manifest, changes=changes)
    stages.lap("weights")
    keepalive.check()  # never publish after another run has taken the lease over
    published = store.latest_version() != version
    if published:
        store.publish(version)
        log.info("published %s: `latest` moved from %s", version, before_version)
    stages.lap("publish")
    summary: ReindexSummary = {
        "status": "published" if published else "up_to_date", "index": store.uri,
        "version_before": before_version, "version_after": version, "rows": manifest.rows,
        "errors": manifest.errors.rows, **changes, "weights": weights,
        "index_stage_seconds": built.get("stage_seconds", {}),
        "featurized": built.get("featurized", 0), "mode": manifest.build.mode if published else None,
    }
    if cfg.reindex.endpoint and published:
        summary["endpoint"] = wait_for_endpoint(cfg, version)
        stages.lap("endpoint")
    return summary


def _changes(before: IndexManifest | None, manifest: IndexManifest) -> Changes:
    """Rows added / changed / removed between the published version and ``manifest``."""
    if before is not None and before.version == manifest.version:
        return {"rows_added": 0, "rows_changed": 0, "rows_removed": 0, "changed_fraction": 0.0}
    build = manifest.build
    if build is None or build.base is None:  # a full build: everything is new, the old rows are all gone
        added, changed, removed = manifest.rows + manifest.errors.rows, 0, before.rows if before else 0
    else:
        added, changed, removed = build.new, build.changed, build.removed
    base_rows = (before.rows + before.errors.rows) if before else 0
    fraction = (added + changed + removed) / base_rows if base_rows else 1.0
    return {"rows_added": added, "rows_changed": changed, "rows_removed": removed,
            "changed_fraction": round(fraction, 6)}


def _weights(cfg: ProjectConfig, req: ReindexRequest, store: IndexStore, root: str, *, manifest: IndexManifest,
             changes: Changes) -> WeightsDecision:
    """Learn weights for the new version when ``reindex.relearn`` asks for it; say why (not)."""
    name = cfg.weights.name
    version = manifest.version
    existing = find_weights(store, manifest, name)
    learned_on = existing["index"]["version"] if existing else None
    since = changes_between(store, store.manifest(learned_on), manifest) if learned_on not in (None, version) else None
    learn, reason = relearn_decision(cfg.reindex, version, learned_on,
                                     since["changed_fraction"] if since else changes["changed_fraction"])
    if not learn:
        return {"learned": False, "artifact": f"{store.uri}/{artifact_path(learned_on, name)}",
                "learned_on": learned_on, "reason": reason, "changed_since_learned": since}
    log.info("learning weights for %s: %s", version, reason)
    _, learning = ensure_weights(cfg, root, version, model=req.model or cfg.model.path, ray_address=req.ray_address)
    return {"learned": learning is not None, "artifact": f"{store.uri}/{artifact_path(version, name)}",
            "learned_on": version,
            "reason": reason if learning is not None else f"{reason}; weights with the same settings were there",
            "seconds": learning.get("seconds") if learning else None, "changed_since_learned": since}


def version_keys(store: IndexStore, manifest: IndexManifest) -> dict[str, str]:
    """example id -> content hash of every row of a version (indexed or quarantined), read
    from the key columns of its shards."""
    paths = [s.path for s in manifest.shards] + list(manifest.errors.shards)
    out: dict[str, str] = {}
    for table in shard_keys(store, paths).values():
        out.update(zip(table.column("example_id").to_pylist(), table.column("content_hash").to_pylist()))
    return out


def changes_between(store: IndexStore, old: IndexManifest, new: IndexManifest) -> ChangesSince:
    """Rows added / changed / removed from version ``old`` to ``new`` (any number of versions
    apart), and their share of ``old``'s rows."""
    before, after = version_keys(store, old), version_keys(store, new)
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for eid in before.keys() & after.keys() if before[eid] != after[eid])
    fraction = (added + changed + removed) / len(before) if before else 1.0
    return {"since": old.version, "rows_added": added, "rows_changed": changed, "rows_removed": removed,
            "changed_fraction": round(fraction, 6)}


def relearn_decision(rcfg: ReindexConfig, version: str, learned_on: str | None,
                     changed_fraction: float) -> tuple[bool, str]:
    """(learn weights for ``version``?, why) given the version the nearest fitting weights were
    learned on (None: none fit) and the share of rows changed since that version."""
    if rcfg.relearn == "always":  # (weights already learned for it with the same settings are reused)
        return True, "reindex.relearn is 'always'"
    if learned_on == version:  # an earlier run learned them, then stopped before publishing
        return False, "already learned for this version"
    if learned_on is None:
        return True, "no learned weights fit this version (a first build, or the features changed)"
    if changed_fraction > rcfg.relearn_fraction:
        return True, (f"{changed_fraction:.1%} of the rows changed since {learned_on}, more than reindex.relearn_fraction "
                      f"({rcfg.relearn_fraction:.1%})")
    return False, (f"{changed_fraction:.1%} of the rows changed since {learned_on}, not more than "
                   "reindex.relearn_fraction "
                   f"({rcfg.relearn_fraction:.1%}): the weights learned on {learned_on} still serve")


def wait_for_endpoint(cfg: ProjectConfig, version: str) -> EndpointSwap:
    """Wait until ``<reindex.endpoint>/v1/index`` answers from ``version`` on every partition."""
    url = cfg.reindex.endpoint.rstrip("/")
    key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
    started = time.monotonic()
    try:
        wait_ready(url, cfg.reindex.endpoint_timeout_s, version=version, api_key=key, watch_app=False)
    except TimeoutError as exc:
        raise EndpointTimeoutError(
            f"{version} is published, but {exc}; is the endpoint deployed with `version: null` and "
            "serve.refresh_s > 0, and can it read the index root?") from exc
    return {"url": url, "serving": version, "swapped_after_s": round(time.monotonic() - started, 3)}
