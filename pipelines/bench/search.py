"""``attribution bench search``: exact scan vs approximate search at 10^5-10^7 rows.

Rows are synthesised from an index's features (default: the demo index; the rows of
``attribution bench serve``: mixtures of two real rows plus noise at 0.3 of each
coordinate's spread) into a float16 file, as an approximate searcher holds them. Queries are
other such mixtures, weighted by every aspect of the index's learned weights (and uniform)
and preconditioned by its kernel, as the endpoint does; each query's aspects are searched in
one call, as a searcher does. For each N the exact scan (``SearchIndex``) answers first; its
top-k is the truth for recall@k of the approximate search (``RescoredSearch``: candidates
from 4-bit product codes, rescored exactly from the file). Reported per tier: p50 / p99 ms
per query with all aspects and with one (``one_aspect``), on ``--threads`` threads as a
searcher replica runs; recall per aspect (mean and lowest query), build seconds, bytes per
row held in memory.

``--simulate N`` adds a run at N rows whose codes are those of the largest real run repeated
(codes only in memory; the repeated rows rescore against their originals in the file): the
time and memory of searching N rows with that run's quantisers. Its recall is not measured,
since repeated rows tie.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.answers import UNIFORM
from attribution_core.config import ProjectConfig
from attribution_core.errors import InputError
from attribution_core.index.approximate import (ADD_ROWS, MIN_TRAIN_ROWS, RESCORING_THREADS, AnnSettings,
                                                ApproximateIndex, RescoredSearch, Whitening, default_settings,
                                                set_threads, training_sample)
from attribution_core.index.reader import LoadedIndex, load_index
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.index.search import SearchIndex
from attribution_core.index.store import IndexStore
from attribution_core.weights.artifact import find_weights, weights_matrix
from pipelines.bench.serve import mixture_rows
from pipelines.output import print_report

log = logging.getLogger(__name__)

BLOCK_ROWS = 16_384  # rows synthesised at a time
SIMULATED_CODES = 65_536  # distinct codes a simulated run repeats


def _rows_file(base: LoadedIndex, n: int, path: Path, seed: int) -> torch.Tensor:
    """``[n, D]`` float16 rows synthesised from the base into a file mapped into memory."""
    x = base.features.float()
    spread = x.std(dim=0)
    gen = torch.Generator().manual_seed(seed)
    rows = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, x.shape[1]))
    for start in range(0, n, BLOCK_ROWS):
        block, _ = mixture_rows(x, spread, min(BLOCK_ROWS, n - start), gen)
        rows[start : start + len(block)] = block.numpy().astype(np.float16)
    rows.flush()
    return torch.from_numpy(rows)


def _queries(base: LoadedIndex, aspects: list[str], weights: dict[str, Any], *, count: int, seed: int) -> torch.Tensor:
    """``[count, A, D]``: query features (mixtures, as the rows) under each aspect's weights and the kernel."""
    stored = base.stored_features().float()
    g, _ = mixture_rows(stored, stored.std(dim=0), count, torch.Generator().manual_seed(seed))
    matrix = weights_matrix(weights, aspects)
    return preconditioned_queries(g, matrix, base.layout, base.kernel).permute(1, 0, 2).contiguous()


def _latencies(search: Any, queries: torch.Tensor, k: int) -> tuple[list[float], torch.Tensor]:
    """Milliseconds per query (its aspects in one call) and the rows found, ``[Q, A, k]``."""
    search.topk(queries[0], k)  # warm-up
    times, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, rows = search.topk(q, k)
        times.append((time.perf_counter() - started) * 1000)
        found.append(rows)
    return times, torch.stack(found)


class Latency(TypedDict):
    p50_ms: float
    p99_ms: float
    mean_ms: float


class Timed(Latency):
    one_aspect: Latency
    """The same queries asking for the first aspect alone (a request for 'general')."""


class Tier(Timed, total=False):
    """One search tier at one row count: how it was built, its latency, bytes per row and
    (approximate) its recall against the exact scan."""

    tier: str
    simulated: bool
    kernel: str
    build_s: float
    train_s: float
    code_s: float
    fill_s: float
    pack_s: float
    bytes_per_row: float
    recall: dict[str, dict[str, float]] | None
    recall_min_aspect_mean: float


def _timing(times: list[float]) -> Latency:
    return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "mean_ms": round(statistics.fmean(times), 2)}


def _timed(search: Any, queries: torch.Tensor, k: int, threads: int,
           *, torch_threads: int | None = None) -> tuple[Timed, torch.Tensor]:
    """Latency per query with every aspect in one call (a request for all of them) and with
    the first aspect alone (a request for 'general', the default), on ``threads`` threads
    (``torch_threads`` of them torch's, as a searcher of the tier sets them)."""
    torch.set_num_threads(torch_threads or threads)
    set_threads(threads)
    times, found = _latencies(search, queries, k)
    one, _ = _latencies(search, queries[:, :1], k)
    torch.set_num_threads(os.cpu_count() or 1)  # building uses the machine
    set_threads(os.cpu_count() or 1)
    return {**_timing(times), "one_aspect": _timing(one)}, found


def _recall(found: torch.Tensor, truth: torch.Tensor, aspects: list[str]) -> dict[str, dict[str, float]]:
    """Per aspect: mean and lowest recall@k over the queries (the share of the exact top-k found)."""
    out = {}
    for a, aspect in enumerate(aspects):
        per_query = [len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found[:, a], truth[:, a])]
        out[aspect] = {"mean": round(statistics.fmean(per_query), 4), "min": round(min(per_query), 4)}
    return out


def _exact(rows: torch.Tensor, queries: torch.Tensor, k: int, threads: int) -> tuple[Tier, torch.Tensor]:
    started = time.perf_counter()
    index = SearchIndex(rows)
    build = time.perf_counter() - started
    timing, found = _timed(index, queries, k, threads)
    result: Tier = {"tier": "exact", "kernel": index.kernel, "build_s": round(build, 2),
                    "bytes_per_row": index.bytes_per_row, **timing}
    del index
    return result, found


def _approximate(rows: torch.Tensor, queries: torch.Tensor, k: int, settings: AnnSettings,
                 *, whitening: Whitening | None, threads: int) -> tuple[Tier, torch.Tensor, ApproximateIndex,
                                                                        bytes]:
    """The approximate tier's report and rows found, its index, and its trained quantisers."""
    started = time.perf_counter()
    array = rows.numpy()
    index = ApproximateIndex.train(training_sample(array, settings.seed), rows.shape[1], settings, whitening)
    trained_bytes = index.to_bytes()
    trained = time.perf_counter()
    for start in range(0, len(array), ADD_ROWS):
        index.add(array[start : start + ADD_ROWS])
    coded = time.perf_counter()
    search = RescoredSearch(index, rows, threads)  # packs the codes for scanning
    packed = time.perf_counter()
    timing, found = _timed(search, queries, k, threads, torch_threads=RESCORING_THREADS)
    return ({"tier": "approximate", "kernel": search.kernel, "build_s": round(packed - started, 2),
             "train_s": round(trained - started, 2), "code_s": round(coded - trained, 2),
             "pack_s": round(packed - coded, 2), "bytes_per_row": index.bytes_per_row, **timing},
            found, index, trained_bytes)


class SearchRun(TypedDict, total=False):
    """One row count of ``bench search``: the exact scan, the approximate search with its
    recall against it, and the approximate layout's settings (a simulated run: approximate only)."""

    rows: int
    exact: Tier
    approximate: Tier
    settings: dict[str, Any]


class SearchBench(TypedDict):
    index: str
    index_version: str
    dim: int
    float16_bytes_per_row: int
    aspects: list[str]
    queries: int
    k: int
    threads: int
    results: list[SearchRun]


def _simulated(index: ApproximateIndex, trained: bytes, rows: torch.Tensor, n: int, *, queries: torch.Tensor,
               k: int, threads: int) -> Tier:
    """``index``'s quantisers over ``n`` rows: its rows' codes, then the codes of its first
    rows repeated; a repeated row is rescored against the stored row it repeats."""
    real = index.rows
    codes = index.encode(rows[: min(real, SIMULATED_CODES)].numpy())
    big = ApproximateIndex.from_bytes(trained, index.dim, index.settings, index.whitening)
    started = time.perf_counter()
    for start in range(0, real, ADD_ROWS):
        big.add_codes(index.encode(rows[start : start + ADD_ROWS].numpy()))
    while big.rows < n:
        big.add_codes(codes[: min(n - big.rows, len(codes))])
    filled = time.perf_counter() - started

    class Repeated:
        shape = (n, rows.shape[1])

        def __getitem__(self, numbers: torch.Tensor) -> torch.Tensor:
            return rows[torch.where(numbers < real, numbers, (numbers - real) % len(codes))]

    started = time.perf_counter()
    search = RescoredSearch(big, Repeated(), threads)
    packed = time.perf_counter() - started
    timing, _ = _timed(search, queries, k, threads, torch_threads=RESCORING_THREADS)
    return {"tier": "approximate", "simulated": True, "kernel": search.kernel, "fill_s": round(filled, 2),
            "pack_s": round(packed, 2), "bytes_per_row": big.bytes_per_row, **timing, "recall": None}


def run(index_uri: str, sizes: list[int], *, simulate: int, queries: int, k: int, seed: int, work: Path,
        threads: int = 1, **overrides: int) -> SearchBench:
    """The report; ``overrides``: ``AnnSettings`` fields to set instead of the defaults for N rows."""
    base = load_index(index_uri)
    store = IndexStore(index_uri)
    weights = find_weights(store, base.manifest, "learned") or {"groups": list(base.layout.group_names), "aspects": {}}
    aspects = [*weights["aspects"], UNIFORM]
    q = _queries(base, aspects, weights, count=queries, seed=seed + 1)
    results: list[SearchRun] = []
    last = None
    for n in sizes:
        log.info("search bench: %d rows", n)
        rows = _rows_file(base, n, work / f"rows-{n}.f16", seed)
        exact, truth = _exact(rows, q, k, threads)
        settings = dataclasses.replace(default_settings(n, rows.shape[1], seed), **overrides)
        approx, found, index, trained = _approximate(rows, q, k, settings,
                                                     whitening=Whitening.from_kernel(base.kernel), threads=threads)
        approx["recall"] = _recall(found, truth, aspects)
        approx["recall_min_aspect_mean"] = min(r["mean"] for r in approx["recall"].values())
        results.append({"rows": n, "exact": exact, "approximate": approx, "settings": vars(settings)})
        log.info("search bench: %s", results[-1])
        last = (index, trained, rows)
    if simulate:
        if last is None:
            raise InputError("--simulate repeats the codes of the largest --rows run: give at least one --rows")
        results.append({"rows": simulate, "approximate": _simulated(*last, simulate, queries=q, k=k, threads=threads)})
    return SearchBench(index=index_uri, index_version=base.manifest.version, dim=base.layout.k_total,
                       float16_bytes_per_row=2 * base.layout.k_total, aspects=aspects, queries=queries, k=k,
                       threads=threads, results=results)


def main(args: argparse.Namespace) -> int:
    if min(args.rows) < MIN_TRAIN_ROWS or (args.simulate and args.simulate <= max(args.rows)):
        raise InputError(f"--rows must each be at least {MIN_TRAIN_ROWS} and --simulate 0 or more than the largest "
                         f"--rows; got {args.rows} and {args.simulate}")
    cfg = ProjectConfig.load(args.config)
    index = args.index or cfg.index.out
    if IndexStore(index).latest() is None:
        raise InputError(f"no committed index at {index!r} to draw rows from; run `make demo` (or `attribution index`) "
                         "first, or pass --index")
    with tempfile.TemporaryDirectory(prefix="bench-search-", dir=args.work) as work:
        overrides = {name: value for name, value in (("code_bytes", args.code_bytes),
                                                      ("candidates", args.candidates)) if value}
        report = run(index, args.rows, simulate=args.simulate, queries=args.queries, k=args.k, seed=args.seed,
                     work=Path(work), threads=args.threads, **overrides)
    print_report(report, args.json)
    return 0
