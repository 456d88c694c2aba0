"""``attribution bench serve``: latency and throughput of the query endpoint over HTTP.

Builds a real index of ``--base`` examples with the config's model (the trained demo model
when it exists, else one of the same architecture with random weights: speed does not
depend on the weights), then for each N an index version of N rows whose features are
synthetic: convex mixtures of two real rows plus Gaussian noise at each coordinate's
spread, stored, versioned and loaded like any index (same feature spec, the base's kernel
and learned weights when the base has them). The endpoint serves each version in turn;
clients send real images over HTTP on 127.0.0.1 at each concurrency and the latency is
measured at the client (the featurizers' cache is off: every request is featurized).
``featurize_share`` is featurize time / (featurize + search time) as the replicas report them;
``standalone`` is the same queries featurized and searched in this process, the floor under
the endpoint.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import socket
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import yaml

from attribution_core.config import ApproximateConfig, ProjectConfig, to_mapping
from attribution_core.data.writers import synthetic_rows, write_synthetic
from attribution_core.errors import ConfigError
from attribution_core.features.query import featurize_images
from attribution_core.index.approximate import RESCORING_THREADS, set_threads
from attribution_core.index.manifest import Quarantine, Shard
from attribution_core.index.opening import open_for_model
from attribution_core.index.reader import load_index
from attribution_core.index.schema import features_table
from attribution_core.index.store import IndexStore, shard_name
from attribution_core.models.pipeline_dir import is_model_dir
from attribution_core.models.tiny import build_tiny_pipeline
from attribution_core.weights.artifact import artifact_path, find_weights
from attribution_core.weights.served import ServedIndex
from pipelines.index.approximate import build_approximate
from pipelines.index.job import IndexRequest, run_index
from pipelines.models import load_model_dir
from pipelines.output import print_report
from pipelines.ray_runtime import ensure_ray
from pipelines.serve.app import ServeArgs
from pipelines.serve.messages import replica_threads
from pipelines.serve.runner import deploy, start, stop, wait_ready

log = logging.getLogger(__name__)

SHARD_ROWS = 8192


def mixture_rows(x: torch.Tensor, spread: torch.Tensor, n: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows like ``x``'s: convex mixtures of two of its rows plus Gaussian noise at 0.3 of
    each coordinate's spread; and the first row of each mixture (whose caption it takes)."""
    a = torch.randint(0, x.shape[0], (n,), generator=gen)
    c = torch.randint(0, x.shape[0], (n,), generator=gen)
    lam = torch.rand(n, 1, generator=gen)
    return lam * x[a] + (1 - lam) * x[c] + 0.3 * spread * torch.randn(n, x.shape[1], generator=gen), a


class SyntheticVersion(TypedDict):
    version: str
    weights: bool
    """Whether the base's learned weights were copied beside it."""


def synthetic_version(base_uri: str, out_uri: str, n: int, seed: int,
                      *, approximate: ApproximateConfig | None = None) -> SyntheticVersion:
    """Commit an index version of ``n`` synthetic rows at ``out_uri`` with the base's spec,
    and its approximate index as ``approximate`` (``index.approximate``) builds one (on Ray)."""
    import pyarrow as pa


    base = load_index(base_uri)
    store = IndexStore(out_uri)
    version = f"v00001-synthetic{n}"
    gen = torch.Generator().manual_seed(seed)
    x = base.features
    spread = x.std(dim=0)
    shards = []
    for first in range(0, n, SHARD_ROWS):
        b = min(SHARD_ROWS, n - first)
        rows, a = mixture_rows(x, spread, b, gen)
        ids = [f"synthetic-{i:08d}" for i in range(first, first + b)]
        keys = pa.table({"example_id": ids, "content_hash": ids, "uri": [f"synthetic://{i}" for i in ids],
                         "caption": [base.captions[j] for j in a.tolist()]})
        path = f"{store.version_dir(version)}/features/{shard_name(ids)}"
        size = store.write_table(path, features_table(keys, rows, base.layout, base.manifest.dtype))
        shards.append(Shard(path, b, size))
    blocks = []
    for block in base.manifest.stats["blocks"]:  # the base's kernel: a preconditioner of the same features
        rel = f"{store.version_dir(version)}/stats/kernel.{block['offset']}.npy"
        store.write_array(rel, IndexStore(base_uri).read_array(block["kernel"]))
        blocks.append({**block, "kernel": rel, "gram": None})
    stats = {**base.manifest.stats, "blocks": blocks}
    approximate_entry = build_approximate(approximate, store=store, version=version, shards=shards,
                                          layout=base.manifest.layout, stats=stats, base=None) if approximate else None
    manifest = dataclasses.replace(
        base.manifest, version=version, sequence=1, supersedes=None, shards=tuple(shards), errors=Quarantine(),
        stats=stats, build=None, approximate=approximate_entry,
        dataset={"kind": "synthetic-mixture", "base": base_uri, "base_version": base.manifest.version, "seed": seed})
    base_store = IndexStore(base_uri)
    weights = find_weights(base_store, base_store.latest(), "learned")
    if weights is not None:
        store.write_json(artifact_path(version, "learned"), weights)
    store.commit(manifest)
    return {"version": version, "weights": weights is not None}


def _post(url: str, body: bytes) -> tuple[int, float, dict]:
    started = time.perf_counter()
    req = urllib.request.Request(f"{url}/v1/attributions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
            status = r.status
    except urllib.error.HTTPError as e:
        answer, status = json.loads(e.read()), e.code
    return status, (time.perf_counter() - started) * 1000, answer


class LoadRun(TypedDict):
    """One load level against the endpoint: latency percentiles, throughput, and where the
    replicas say the time went."""

    concurrency: int
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    rps: float
    featurize_share: float | None
    featurize_ms_mean: float
    search_ms_mean: float
    server_ms_mean: float
    featurize_batch_mean: float


def measure(url: str, bodies: list[bytes], concurrency: int, warmup: int = 4) -> LoadRun:
    for body in bodies[:warmup]:
        _post(url, body)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - started
    ok = [(ms, a) for status, ms, a in results if status == 200]
    latencies = sorted(ms for ms, _ in ok)
    featurize = sum(a["timing_ms"]["featurize"] for _, a in ok)
    search = sum(a["timing_ms"]["search"] for _, a in ok)
    return LoadRun(
        concurrency=concurrency, requests=len(bodies), errors=len(results) - len(ok),
        p50_ms=round(statistics.median(latencies), 1), p99_ms=round(float(np.percentile(latencies, 99)), 1),
        rps=round(len(ok) / wall, 2),
        featurize_share=round(featurize / (featurize + search), 3) if featurize + search else None,
        featurize_ms_mean=round(featurize / len(ok), 1), search_ms_mean=round(search / len(ok), 1),
        server_ms_mean=round(statistics.fmean(a["timing_ms"]["total"] for _, a in ok), 1),
        featurize_batch_mean=round(statistics.fmean(a["timing_ms"]["featurize_batch"] for _, a in ok), 2))


class Floor(TypedDict):
    """Featurize and search p50 in one process, no Serve between them."""

    featurize_p50_ms: float
    search_p50_ms: float
    sum_p50_ms: float
    search: str
    queries: int


def standalone(cfg: ProjectConfig, model_dir: str, index_uri: str, rows: list[dict[str, Any]],
               *, aspects: list[str] | None, k: int) -> Floor:
    """The floor under the endpoint: featurizing and searching the same queries in this process,
    with the replicas' threads and search settings, no Serve between them (p50 ms of each)."""

    scfg = cfg.serve
    adapter = load_model_dir(model_dir, "cpu")
    _, featurizer = open_for_model(IndexStore(index_uri), None, adapter, model_dir,
                                   max_rows_per_pass=cfg.featurize.max_rows_per_pass)
    threads = replica_threads(scfg.searcher_threads)
    served = ServedIndex.load(index_uri, weights_name=scfg.weights, search=scfg.search,
                              candidates=scfg.search_candidates, rows_dir=scfg.rows_dir, threads=threads)
    resolved = served.resolve_aspects(tuple(aspects or scfg.default_aspects), fallback_uniform=aspects is None)
    weightings = [sorted(set(resolved.values()))]
    featurize_ms, search_ms = [], []
    for i, row in enumerate(rows):
        torch.set_num_threads(scfg.threads or torch.get_num_threads())
        started = time.perf_counter()
        features = featurize_images(featurizer, [row["image"]], prompts=[row["caption"]])
        featurized = time.perf_counter()
        torch.set_num_threads(RESCORING_THREADS if served.search_mode == "approximate" else threads)
        set_threads(threads)
        served.search(features, weightings, [k])
        if i:  # the first query warms both up
            featurize_ms.append((featurized - started) * 1000)
            search_ms.append((time.perf_counter() - featurized) * 1000)
    f, s = statistics.median(featurize_ms), statistics.median(search_ms)
    return {"featurize_p50_ms": round(f, 1), "search_p50_ms": round(s, 1), "sum_p50_ms": round(f + s, 1),
            "search": served.search_mode, "queries": len(featurize_ms)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(args: argparse.Namespace) -> int:

    if len(args.requests) != len(args.concurrency):
        raise ConfigError(f"--requests gives {len(args.requests)} counts for {len(args.concurrency)} --concurrency "
                          "levels; give one request count per level")
    cfg = ProjectConfig.load(args.config)
    ensure_ray(args.ray_address)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = Path(cfg.model.path)
    trained = is_model_dir(model_dir)
    if not trained:

        t = cfg.train
        model_dir = build_tiny_pipeline("text", work / "model", resolution=t.resolution, widths=tuple(t.widths))
    data = str(work / "data")
    write_synthetic(data, args.base, seed=3, size=cfg.data.synthetic.size if cfg.data.synthetic else 32,
                    rows_per_file=256)
    base_uri = str(work / "base-index")
    run_index(cfg, IndexRequest(dataset=data, model=str(model_dir), out=base_uri, mode="full"))
    if args.weights_from:  # learned weights of another index with the same features (e.g. the demo's)
        src = IndexStore(args.weights_from)
        doc = find_weights(src, src.latest(), cfg.weights.name)
        if doc is not None:
            base_store = IndexStore(base_uri)
            base_store.write_json(artifact_path(base_store.latest().version, "learned"), doc)

    # Query images: examples the index was not built from, with their captions.
    queries = list(synthetic_rows(max(args.requests), seed=77, size=cfg.data.synthetic.size if cfg.data.synthetic else 32))
    aspects = [a.strip() for a in args.aspects.split(",")] if args.aspects else None
    bodies = [json.dumps({"image": base64.b64encode(r["image"]).decode(), "prompt": r["caption"], "k": args.k,
                          **({"aspects": aspects} if aspects else {})}).encode() for r in queries]

    # The same query bodies go to every level: with the feature cache on, repeats would skip featurizing.
    serve_cfg = dataclasses.replace(cfg.serve, threads=cfg.serve.threads if args.threads is None else args.threads,
                                    feature_cache=0)
    port = _free_port()
    results, url = [], None
    try:
        for n in args.n:
            index_uri = str(work / f"index-{n}")
            version = synthetic_version(base_uri, index_uri, n, seed=n, approximate=cfg.index.approximate)
            config = work / f"serve-{n}.yaml"
            settings = {**to_mapping(cfg), "serve": {**to_mapping(serve_cfg), "host": "127.0.0.1", "port": port},
                        "index": {**to_mapping(cfg.index), "out": index_uri},
                        "model": {**to_mapping(cfg.model), "path": str(model_dir)}}
            config.write_text(yaml.safe_dump(settings))
            sargs = ServeArgs(config=str(config))
            if url is None:
                url, _ = start(sargs, timeout_s=600)
            else:
                deploy(sargs, "127.0.0.1", port)
                wait_ready(url, 600, version=version["version"])
            info = json.loads(urllib.request.urlopen(f"{url}/v1/index", timeout=30).read())
            floor = standalone(dataclasses.replace(cfg, serve=serve_cfg), str(model_dir), index_uri,
                               queries[: min(args.requests) + 1], aspects=aspects, k=args.k)
            log.info("standalone featurize + search at %d rows: %s", n, floor)
            for concurrency, count in zip(args.concurrency, args.requests):
                row = measure(url, bodies[:count], concurrency)
                results.append({"n_rows": n, **row, "aspects": aspects or list(cfg.serve.default_aspects),
                                "search": info["search"], "search_kernel": info["search_kernel"],
                                "featurize_in": serve_cfg.featurize_in, "partitions": serve_cfg.partitions,
                                "weights": info["weights"] is not None, "standalone": floor,
                                "p50_over_standalone": round(row["p50_ms"] / floor["sum_p50_ms"], 3)})
                log.info("measured %s", json.dumps(results[-1]))
    finally:
        stop()
    out = {"results": results, "model": str(model_dir), "model_trained": trained, "base_examples": args.base,
           "k": args.k, "threads_per_replica": serve_cfg.threads, "k_total": load_index(base_uri).layout.k_total,
           "work": str(work)}
    print_report(out, args.json)
    return 0
