"""``attribution bench weights``: weight learning's cost against N, and a first aspect recall.

Part 1 (synthetic features, regenerated block by block so N = 10^6 is never held): for each N,
one mining scan of the index with Ray Data (pools + noise moments; ``scan_s``) and one
optimisation of theta on Ray Train (``optimise_s``), for the same queries. The optimisation
sees only pools and M x M moments, so its time should not grow with N.

Part 2 (``--index`` with learned weights, e.g. the demo's): Recall@10 of each aspect's
attribute for generated evaluation queries of known subject/style/background, under that
aspect's weights, the general weights, uniform weights and pixel kNN (``attribution evaluate``
measures the same at the config's settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.config import ProjectConfig
from attribution_core.index.reader import load_index
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import artifact_path, check_weights
from attribution_core.weights.objective import group_queries
from attribution_core.weights.pools import mining_weightings, pools_from_state
from attribution_core.weights.synthetic import BLOCK, synthetic_layout, synthetic_queries
from pipelines.evaluation.aspects import run_recall
from pipelines.output import print_report
from pipelines.ray_runtime import cluster_cpus, ensure_ray
from pipelines.weights.scan import scan
from pipelines.weights.train import AspectPools, TrainStorage, optimise


def scaling(cfg: ProjectConfig, sizes: list[int], queries: int, groups: int, *, dim: int) -> list[dict[str, Any]]:
    layout = synthetic_layout(groups, dim)
    wcfg = cfg.weights
    out = []
    for n in sizes:
        q, _ = synthetic_queries(n, queries, layout, signal=(1, groups // 2), seed=0)
        grouped = group_queries(q, layout, None)
        source = {"kind": "synthetic", "n": n, "k_total": layout.k_total, "seed": 0}
        start = time.perf_counter()
        state = scan(source, list(range((n + BLOCK - 1) // BLOCK)), grouped, mining_weightings(groups),
                     r=wcfg.pool_size, with_noise=True, partitions=wcfg.scan_partitions or cluster_cpus())
        scan_s = time.perf_counter() - start
        pools = pools_from_state(state)
        part = AspectPools(contrib=pools.contrib.numpy(), valid=pools.valid.numpy(), noise=state.noise.numpy())
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-weights-") as storage:  # Ray Train's run folder
            result = optimise([part], np.zeros((1, groups)), wcfg, TrainStorage(storage), name=f"n{n}")
        optimise_s = time.perf_counter() - start
        out.append({"n": n, "queries": queries, "groups": groups, "k_total": layout.k_total,
                    "pool_candidates": int(pools.valid.shape[1]), "steps": wcfg.steps, "workers": wcfg.workers,
                    "scan_s": round(scan_s, 2), "optimise_s": round(optimise_s, 2),
                    "objective": result.trajectory[-1]["objective"]})
    return out


class AspectRecall(TypedDict):
    queries: int
    k: int
    seed: int
    table: dict[str, dict[str, float]]
    """Aspect -> column (its own weights, general, uniform, contrastive, pixel kNN) -> Recall@k."""


def aspect_recall(cfg: ProjectConfig, index_uri: str, queries: int, k: int, *, seed: int) -> AspectRecall:
    """Recall@k of each aspect's attribute: its learned weights vs general vs uniform weights
    vs pixel kNN, for generated queries of known attributes (the evaluation's Recall@K)."""

    index = load_index(index_uri)
    manifest = index.manifest
    document = IndexStore(index_uri).read_json(artifact_path(manifest.version, cfg.weights.name))
    if document is None:
        raise FileNotFoundError(f"no weights {cfg.weights.name!r} for {index_uri} {manifest.version}; "
                                "run `attribution learn-weights` first")
    check_weights(document, manifest)
    ecfg = dataclasses.replace(cfg.evaluate, recall_queries=queries, recall_k=k, seed=seed, gallery=0)
    result = run_recall(dataclasses.replace(cfg, evaluate=ecfg), index, document)
    return AspectRecall(queries=queries, k=k, seed=seed,
                        table={a: {name: round(v, 4) for name, v in row.items()} for a, row in result.table.items()})


def main(args: argparse.Namespace) -> int:
    cfg = ProjectConfig.load(args.config)
    ensure_ray(args.ray_address)
    result: dict[str, Any] = {}
    if not args.skip_scaling:
        sizes = [int(s) for s in args.sizes.split(",")]
        result["results"] = scaling(cfg, sizes, args.queries, args.groups, dim=args.dim)
    if args.index:
        torch.manual_seed(0)
        result["recall"] = aspect_recall(cfg, args.index, args.eval_queries, args.k, seed=args.eval_seed)
    print_report(result, args.json)
    return 0
