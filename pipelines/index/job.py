"""``attribution index``: featurize a dataset on Ray Data into a new immutable index version.

Stages (each timed in the summary): scan (ids + content hashes), plan (what to featurize,
reuse, drop), carry (rewrite previous shards that lost rows), featurize (actors hold the
model; one shard per batch), verify (exactly once), stats (Gram + kernel), approximate (the
approximate search index, ``index.approximate``), commit (manifest, then ``latest``). Rerunning the same command after a crash resumes the same version.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
from typing import Any, TypedDict

import ray

from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.errors import ConfigError, InputError
from attribution_core.features.groups import GroupLayout, build_layout
from attribution_core.index.manifest import BuildRecord, FeatureSpec, IndexManifest, ModelRecord, Quarantine, Shard
from attribution_core.index.plan import Plan, check_unique, keys_digest, plan_build
from attribution_core.index.quarantine import too_many_quarantined
from attribution_core.index.source import resolve_source
from attribution_core.index.store import IndexStore, shard_name
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.recipe import resolve_columns
from attribution_core.timing import Stopwatch
from pipelines.index.actors import actor_placement, actor_pool
from pipelines.index.approximate import build_approximate
from pipelines.index.commit import check_exactly_once, dedupe, refuse_if_quarantined, shard_ids
from pipelines.index.damping import kernel_settings, kernel_stats
from pipelines.index.listing import CurrentKeys, listing_summary, write_source_keys
from pipelines.index.scan import choose_base, concat_keys, current_keys, read_source, shard_keys
from pipelines.index.stages import IndexActor, rewrite_shard
from pipelines.models import ModelRef
from pipelines.ray_runtime import ensure_ray, require_shared_storage, retry_on_node_loss, watched

log = logging.getLogger(__name__)
MODES = ("auto", "incremental", "full")


class IndexSummary(TypedDict, total=False):
    """What ``run_index`` returns and ``attribution index --json`` prints. Always ``version``,
    ``up_to_date``, ``uri``, ``rows`` and ``errors`` (quarantined); for a version built now,
    how the build ran (the manifest's ``BuildRecord``, with ``source_*`` for a listed
    Parquet dataset) and its throughput."""

    version: str
    up_to_date: bool
    uri: str
    rows: int
    errors: int
    featurized: int
    seconds: float
    rows_per_s: float
    bytes_per_example: float
    mode: str
    actors: int
    threads_per_actor: int
    actor_busy_seconds: float
    steady_rows_per_s: float | None
    rows_by_node: dict[str, int]
    stage_seconds: dict[str, float]
    source_files: int
    source_files_unchanged: int
    source_files_hashed: int
    source_files_featurized: int
    source_bytes_read: int
    source_bytes: int


@dataclasses.dataclass(frozen=True)
class IndexRequest:
    dataset: str
    model: str
    out: str
    mode: str = "auto"  # auto: incremental when the latest version has the same feature spec
    ray_address: str | None = None
    publish: bool = True  # move `latest` at commit; `attribution reindex` moves it after the weights
    base: str | None = None  # the base pipeline of a LoRA ``model`` without lora.json

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef(self.model, self.base)


def describe_model(ref: ModelRef, cfg: ProjectConfig) -> tuple[ModelRecord, GroupLayout]:
    """What the driver needs of the model (fingerprint, class, conditioning, image shape) and
    its group layout. The model itself is dropped before any Ray work: at Stable Diffusion's
    size it is gigabytes the driver would otherwise hold for the whole build."""
    adapter = ref.load("cpu")
    layout = build_layout(adapter.tracked_model(), cfg.featurize.groups, cfg.featurize.projection)
    model = ModelRecord(fingerprint=model_fingerprint(adapter), class_name=type(adapter.denoiser).__name__,
                        conditioning=adapter.conditioning, image_shape=tuple(adapter.image_shape))
    del adapter
    gc.collect()
    return model, layout


@dataclasses.dataclass
class _Target:
    """The version this run builds, from the latest committed one (``previous``) and the one
    whose shards it may reuse (``base``: ``previous`` when the feature specs agree)."""

    version: str
    sequence: int
    previous: IndexManifest | None
    base: IndexManifest | None


def _target(store: IndexStore, spec: FeatureSpec, mode: str, current, *, settings: dict[str, Any]) -> _Target:
    previous, base = choose_base(store, spec, mode)
    digest = hashlib.blake2b(f"{spec.key()}|{keys_digest(current)}|{base.version if base else ''}|"
                             f"{json.dumps(settings, sort_keys=True)}".encode(), digest_size=8).hexdigest()
    sequence = previous.sequence + 1 if previous else 1
    return _Target(f"v{sequence:05d}-{digest}", sequence, previous, base)


def _plan(store: IndexStore, target: _Target, current) -> tuple[Plan, int]:
    """What to featurize, reuse and drop, counting what an interrupted run of this version
    already wrote; and how many stale temporary files were removed."""
    base = target.base
    base_shards = shard_keys(store, [s.path for s in base.shards]) if base else None
    base_errors = shard_keys(store, list(base.errors.shards)) if base else None
    stale = [v for v in store.list_versions() if v != target.version and not store.is_committed(v)]
    if stale:
        log.warning("uncommitted builds from runs with other inputs are left in %s: %s (no reader uses them; "
                    "delete them once no job writes there)", store.uri, ", ".join(stale))
    removed_tmp = store.remove_temporaries(target.version)
    done = concat_keys(shard_keys(store, store.list_shards(target.version, "features")
                                  + store.list_shards(target.version, "errors")))
    return plan_build(current, base_shards, base_errors, done), removed_tmp


def _carry(store: IndexStore, version: str, plan: Plan) -> None:
    """Rewrite the previous version's shards that lost rows (removed or changed examples)."""
    vdir = IndexStore.version_dir(version)
    carry = [{"src": r.path, "dst": f"{vdir}/{kind}/{shard_name(r.keep)}", "keep": list(r.keep)}
             for kind, reuses in (("features", plan.reuse), ("errors", plan.reuse_errors)) for r in reuses if not r.whole]
    if carry:
        ray.data.from_items(carry).map(rewrite_shard, fn_kwargs={"store_uri": store.uri}).materialize()


@dataclasses.dataclass
class _Featurized:
    """What the actors did: rows written, rows quarantined, seconds inside batches, and the
    same without each actor's first batch (its warm-up)."""

    actors: int
    threads: int
    device: str
    rows: int = 0
    errors: int = 0
    busy: float = 0.0
    warm_rows: int = 0
    warm_busy: float = 0.0
    by_node: dict[str, int] = dataclasses.field(default_factory=dict)  # rows featurized per Ray node id

    def steady_rows_per_s(self) -> float | None:
        """Examples/s of the actors working in parallel, from batches after each actor's first
        (which pays for lazy set-up and for other actors starting); None without them."""
        return round(self.warm_rows / (self.warm_busy / self.actors), 2) if self.warm_busy > 0 else None


def _featurize(cfg: ProjectConfig, req: IndexRequest, model: ModelRecord, source, *, plan: Plan,
               store: IndexStore, version: str, files: list[str] | None) -> _Featurized:
    """Featurize ``plan.todo`` on a pool of ``IndexActor``s, one shard per batch (reading only
    the Parquet ``files`` that hold them, when known)."""
    n_actors, threads, device = actor_pool(cfg, batches=math.ceil(len(plan.todo) / cfg.index.batch_size))
    done = _Featurized(n_actors, threads, device)
    if not len(plan.todo):
        return done
    actor_kwargs = {"model": req.model_ref, "featurize": to_mapping(cfg.featurize), "device": device,
                    "threads": threads, "store_uri": store.uri, "version": version, "dtype": cfg.index.dtype,
                    "limits": {"min_side": cfg.index.min_image_side or model.image_shape[1] // 2,
                               "max_aspect": cfg.index.max_aspect_ratio}}
    rows_in = read_source(source, plan.todo, files).repartition(target_num_rows_per_block=cfg.index.batch_size)
    summaries = rows_in.map_batches(
        IndexActor, fn_constructor_kwargs=actor_kwargs, batch_size=cfg.index.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_cpus=cfg.index.cpus_per_actor, num_gpus=cfg.index.gpus_per_actor if device == "cuda" else 0,
        **actor_placement(cfg))
    check_at = cfg.index.quarantine_check_rows
    asks = (f"{n_actors} actors of {cfg.index.cpus_per_actor:g} CPU"
            + (f" and {cfg.index.gpus_per_actor:g} GPU" if device == "cuda" else "")
            + "".join(f" and {v:g} {k}" for k, v in cfg.index.actor_resources.items()) + " each, plus read tasks")
    for row in watched(summaries.iter_rows(), what="the index job's featurize stage", asks=asks,
                       stall_s=cfg.cluster.stall_timeout_s):
        done.rows += row["rows"]
        done.errors += row["errors"]
        done.by_node[row["node"]] = done.by_node.get(row["node"], 0) + row["rows"] + row["errors"]
        if check_at and done.rows + done.errors >= check_at and len(plan.todo) > check_at:
            _stop_if_quarantined(cfg, store, version, done, todo=len(plan.todo))
            check_at = 0  # once, on the first rows
        done.busy += row["seconds"]
        if row["call"] > 0:
            done.warm_rows += row["rows"] + row["errors"]
            done.warm_busy += row["seconds"]
    return done


def _stop_if_quarantined(cfg: ProjectConfig, store: IndexStore, version: str, done: _Featurized, *, todo: int) -> None:
    """After the first ``index.quarantine_check_rows`` examples: stop the build, before the
    rest are featurized, when more than ``index.max_quarantine_fraction`` of them were
    quarantined (the same one-line reasons as the check at the end)."""
    checked = done.rows + done.errors
    if not too_many_quarantined(done.errors, checked, cfg.index.max_quarantine_fraction):
        return
    staged = shard_ids(store, store.list_shards(version, "errors"))
    refuse_if_quarantined(store, {}, staged, checked, max_fraction=cfg.index.max_quarantine_fraction,
                          scope=f"the first {checked:,} of the {todo:,} examples to featurize "
                          "(index.quarantine_check_rows); the build stopped there")


def _verify(cfg: ProjectConfig, store: IndexStore, version: str, plan: Plan,
            *, current) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Every current example featurized or quarantined exactly once, the quarantine within
    ``index.max_quarantine_fraction``; returns (feature shard -> ids, error shard -> ids)."""
    reused_whole = {r.path: list(r.keep) for r in plan.reuse if r.whole}
    staged = dedupe(store, shard_ids(store, store.list_shards(version, "features")))
    staged_errors = shard_ids(store, store.list_shards(version, "errors"))
    reused_errors = {r.path: list(r.keep) for r in plan.reuse_errors if r.whole}
    check_exactly_once(set(current.column("example_id").to_pylist()),
                       {**reused_whole, **staged}, {**reused_errors, **staged_errors})
    refuse_if_quarantined(store, reused_errors, staged_errors, current.num_rows,
                          max_fraction=cfg.index.max_quarantine_fraction)
    return {**reused_whole, **staged}, {**reused_errors, **staged_errors}


def shards_of(store: IndexStore, features: dict[str, list[str]], base: IndexManifest | None) -> list[Shard]:
    """The manifest's shard list: path, rows and bytes of each feature shard, in path order."""
    sizes = {s.path: s.bytes for s in base.shards} if base else {}
    return [Shard(p, len(ids), sizes.get(p) or store.fs.get_file_info(store.path(p)).size)
            for p, ids in sorted(features.items())]


def run_index(cfg: ProjectConfig, req: IndexRequest) -> IndexSummary:
    """Build (or resume) the version for ``req``; resumed again when a node of the cluster
    dies under it (``cluster.node_loss_retries``): the shards written so far are kept."""
    return retry_on_node_loss(lambda: _run_index(cfg, req), what="the index job",
                              retries=cfg.cluster.node_loss_retries)


def _run_index(cfg: ProjectConfig, req: IndexRequest) -> IndexSummary:
    watch = Stopwatch()
    if req.mode not in MODES:
        raise ConfigError(f"unknown index mode {req.mode!r}; choose one of {', '.join(MODES)}")
    model, layout = describe_model(req.model_ref, cfg)
    columns = resolve_columns(req.model, cfg.train, cfg.index)  # the columns the model learned from
    source = resolve_source(req.dataset, columns.caption, columns.label, model.conditioning,  # fail fast, before Ray
                            image_column=cfg.data.image_column, id_column=cfg.data.id_column,
                            keep_columns=cfg.index.keep_columns)
    store = IndexStore(req.out)
    spec = FeatureSpec.build(model.fingerprint, cfg.featurize, layout, cfg.index.dtype)
    ensure_ray(req.ray_address)
    require_shared_storage(cfg.cluster, data__uri=req.dataset, index__out=req.out)
    watch.lap("load")

    found = current_keys(source, store, store.latest())
    current = found.keys
    if current.num_rows == 0:
        raise InputError(f"dataset {req.dataset!r} holds no examples; nothing to index")
    check_unique(current, f"dataset {req.dataset!r}")
    watch.lap("scan")

    settings = {**kernel_settings(cfg), "approximate": to_mapping(cfg.index.approximate)}
    target = _target(store, spec, req.mode, current, settings=settings)
    version, previous, base = target.version, target.previous, target.base
    if store.is_committed(version):  # built before (a run that stopped before publishing, or a rerun)
        if req.publish and (previous is None or previous.version != version):
            store.publish(version)
        return {"version": version, "up_to_date": True, "uri": store.uri, **_counts(store.manifest(version))}
    plan, removed_tmp = _plan(store, target, current)
    if base is not None and plan.is_noop and base.stats.get("settings") == settings:
        log.info("index %s is up to date with %s", base.version, req.dataset)
        return {"version": base.version, "up_to_date": True, "uri": store.uri, **_counts(base)}
    log.info("plan: %(current)d examples, %(todo)d to featurize (%(new)d new, %(changed)d changed, %(resumed)d "
             "resumed from an interrupted run), %(reused)d reused, %(removed)d removed",
             {"current": plan.n_current, "todo": len(plan.todo), "new": plan.n_new, "changed": plan.n_changed,
              "resumed": plan.n_done, "reused": plan.n_reused, "removed": plan.n_removed})
    source_keys = write_source_keys(store, version, found)
    to_open = found.files_holding(plan.todo) if found.files is not None else None
    watch.lap("plan")
    _carry(store, version, plan)
    watch.lap("carry")
    work = _featurize(cfg, req, model, source, plan=plan, store=store, version=version, files=to_open)
    watch.lap("featurize")
    features, errors = _verify(cfg, store, version, plan, current=current)
    watch.lap("verify")

    stats = kernel_stats(cfg, req.model_ref, model.conditioning, work.device, store=store, version=version,
                         paths=sorted(features),
                         layout=layout, lap=watch.lap)
    stats["settings"] = settings
    shards = shards_of(store, features, base)
    approximate = build_approximate(cfg.index.approximate, store=store, version=version, shards=shards,
                                    layout=spec.layout, stats=stats, base=base)
    watch.lap("approximate")
    build = BuildRecord(
        mode="incremental" if base else "full", base=base.version if base else None, new=plan.n_new,
        changed=plan.n_changed, removed=plan.n_removed, reused=plan.n_reused, resumed=plan.n_done,
        featurized=work.rows, quarantined=work.errors, stale_temporaries_removed=removed_tmp, actors=work.actors,
        threads_per_actor=work.threads, device=work.device, batch_size=cfg.index.batch_size,
        actor_busy_seconds=round(work.busy, 3), steady_rows_per_s=work.steady_rows_per_s(), rows_by_node=work.by_node,
        stage_seconds=watch.seconds, source=_source_reads(found, to_open))
    dataset = {**source.to_dict(), "rows": current.num_rows, "keys_digest": keys_digest(current),
               "files": listing_summary(found), "source_keys": source_keys}
    manifest = IndexManifest(
        version=version, sequence=target.sequence, supersedes=previous.version if previous else None,
        model=dataclasses.replace(model, path=req.model, base=req.base), featurize=spec.featurize, layout=spec.layout,
        dtype=spec.dtype, dataset=dataset, shards=tuple(shards),
        errors=Quarantine(sum(len(ids) for ids in errors.values()), tuple(sorted(errors))), stats=stats, build=build,
        approximate=approximate)
    store.commit(manifest, publish=req.publish)
    watch.lap("commit")
    return _summary(store, manifest, watch)


def _source_reads(found: CurrentKeys, opened: list[str] | None) -> dict[str, int]:
    """What the build read of a listed (Parquet) dataset: files whose keys were kept from the
    previous version, files read to hash their rows, files opened to featurize, and the bytes
    of the files read (of the dataset's total)."""
    if found.files is None:
        return {}
    read = sorted(set(found.read_files) | set(opened or []))
    return {"source_files": len(found.files), "source_files_unchanged": found.reused_files,
            "source_files_hashed": len(found.read_files), "source_files_featurized": len(opened or []),
            "source_bytes_read": found.bytes_of(read), "source_bytes": found.bytes_of([f.path for f in found.files])}


def _summary(store: IndexStore, manifest: IndexManifest, watch: Stopwatch) -> IndexSummary:
    """What ``attribution index`` prints about a version it built: its counts, throughput and
    bytes, then the manifest's build record (``stage_seconds`` after every stage, the commit
    included)."""
    build, rows = manifest.build, manifest.rows
    featurize_s = watch.seconds["featurize"]
    return {"version": manifest.version, "up_to_date": False, "uri": store.uri, **_counts(manifest),
            "featurized": build.featurized, "seconds": watch.total(),
            "rows_per_s": round(build.featurized / featurize_s, 2) if build.featurized and featurize_s else 0.0,
            "bytes_per_example": round(sum(s.bytes for s in manifest.shards) / rows, 1) if rows else 0.0,
            **build.source, "mode": build.mode, "actors": build.actors, "threads_per_actor": build.threads_per_actor,
            "actor_busy_seconds": build.actor_busy_seconds, "steady_rows_per_s": build.steady_rows_per_s,
            "rows_by_node": build.rows_by_node, "stage_seconds": watch.seconds}


def _counts(manifest: IndexManifest) -> dict[str, int]:
    return {"rows": manifest.rows, "errors": manifest.errors.rows}
