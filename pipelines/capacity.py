"""``attribution plan``: a capacity plan from a short calibration on the user's own model and
the hardware it runs on.

The calibration does, in this process and on this machine's device, what one index actor and
one endpoint replica do per unit of work:

- index: decode, featurize and tabulate batches of ``index.batch_size`` images (PNG bytes at
  the model's resolution, random pixels: the cost does not depend on the content) with the
  config's groups, timesteps, measurement and projection, after one warm-up batch; one
  batch is written as a feature shard the way the index job writes it (its bytes per row);
- endpoint: featurize one query image, and time exact top-k searches over synthetic float16
  rows of the real width (``k_total``).

The plan scales these linearly: index time = rows / (rows per second per device × devices)
plus one actor start-up (a fresh process importing the stack, measured here, and the model
load; actors start in parallel); storage = rows × bytes per row; searcher
memory = 2 bytes × k_total per row, twice while a new version is swapped in; partitions so
that each searcher fits ``--searcher-memory-gb``; query latency = featurize + search over one
partition + the endpoint's own overhead (``--overhead-ms``: HTTP, routing and merging, as
``attribution bench serve`` measures it against its standalone floor).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tempfile
import time
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import torch

from attribution_core.config import ProjectConfig
from attribution_core.data.images import encode_png
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import GroupLayout
from attribution_core.index.batch import ImageLimits, index_batch
from attribution_core.index.schema import SOURCE_SCHEMA
from attribution_core.index.search import SearchIndex
from attribution_core.index.store import IndexStore
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from pipelines.models import ensure_model, load_model_dir


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What one device did in the calibration."""

    device: str
    threads: int
    batch_size: int
    rows_timed: int
    rows_per_s: float
    load_seconds: float
    startup_seconds: float  # a fresh process importing the featurizer's stack, then the model load
    bytes_per_row: float
    k_total: int
    kernel_bytes: int
    search_rows: int
    search_ms: float
    query_featurize_ms: float


def _source_rows(adapter: DiffusersAdapter, n: int, seed: int) -> pa.Table:
    """``n`` source rows of random PNG images at the model's resolution (+ captions or labels)."""
    c, h, w = adapter.image_shape
    rng = np.random.default_rng(seed)
    images = [encode_png(rng.integers(0, 256, (h, w, 3) if c == 3 else (h, w), dtype=np.uint8)) for _ in range(n)]
    ids = [f"calibration-{seed}-{i}" for i in range(n)]
    caption = "a photo" if adapter.conditioning == "text" else None
    label = "0" if adapter.conditioning == "class" else None
    return pa.table({"example_id": ids, "content_hash": ids, "uri": ids, "image": images,
                     "caption": [caption] * n, "label": [label] * n, "metadata": [None] * n}, schema=SOURCE_SCHEMA)


def _kernel_bytes(layout: GroupLayout, kernel: str, max_full: int) -> int:
    """Bytes of the Gram and kernel blocks a version stores (float64)."""
    if kernel == "full" or (kernel in ("auto", "objective") and layout.k_total <= max_full):
        return 2 * 8 * layout.k_total ** 2
    if kernel == "layer_block":
        return 2 * 8 * sum(layer.dim ** 2 for layer in layout.layers)
    return 2 * 8 * sum(g.dim ** 2 for g in layout.groups)


def _import_seconds() -> float:
    """Seconds a fresh Python process takes to import what an index actor imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipelines.index.stages, diffusers, transformers"], check=True,
                   capture_output=True)
    return time.perf_counter() - started


SEARCH_BYTES = 2**30  # synthetic rows searched by the calibration: 20,000 of the demo's width, fewer of wider ones


def calibrate(cfg: ProjectConfig, *, batches: int = 3, search_rows: int = 20_000, searches: int = 20) -> Calibration:
    """Time the index's and the endpoint's unit of work on this machine (see module doc)."""
    imports = _import_seconds()
    device = "cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu"
    threads = cfg.index.threads_per_actor or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    started = time.perf_counter()
    adapter = load_model_dir(str(ensure_model(cfg.model)), device, cfg.model.base)
    featurizer = Featurizer(adapter, cfg.featurize)
    load_seconds = time.perf_counter() - started
    size = cfg.index.batch_size
    limits = ImageLimits(min_side=cfg.index.min_image_side or adapter.image_shape[1] // 2,
                         max_aspect=cfg.index.max_aspect_ratio)
    warm = index_batch(featurizer, _source_rows(adapter, size, seed=0), cfg.index.dtype, limits)
    started = time.perf_counter()
    for b in range(batches):
        index_batch(featurizer, _source_rows(adapter, size, seed=b + 1), cfg.index.dtype, limits)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="attribution-plan-") as folder:
        shard_bytes = IndexStore(folder).write_table("shard.parquet", warm.features)
    layout = featurizer.layout
    query = ExampleBatch(("calibration-query",), torch.rand(1, *adapter.image_shape) * 2 - 1,
                         captions=("a photo",) if adapter.conditioning == "text" else None,
                         labels=torch.zeros(1, dtype=torch.long) if adapter.conditioning == "class" else None)
    featurizer.flat(query)  # warm
    times = []
    for _ in range(5):
        started = time.perf_counter()
        features = featurizer.flat(query)
        times.append(time.perf_counter() - started)
    # at most SEARCH_BYTES of rows (time is linear in rows; plan() scales it), drawn in float16 chunks
    search_rows = max(1_000, min(search_rows, SEARCH_BYTES // (2 * layout.k_total)))
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.randn(min(4_096, search_rows - i), layout.k_total, generator=g).half()
                      for i in range(0, search_rows, 4_096)])
    index = SearchIndex(rows, device=device)
    del rows
    index.topk(features, cfg.serve.default_k)  # warm
    search = []
    for _ in range(searches):
        started = time.perf_counter()
        index.topk(features, cfg.serve.default_k)
        search.append(time.perf_counter() - started)
    return Calibration(
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({threads} thread{'s' * (threads > 1)})",
        threads=threads, batch_size=size, rows_timed=batches * size, rows_per_s=batches * size / seconds,
        load_seconds=load_seconds, startup_seconds=imports + load_seconds, bytes_per_row=shard_bytes / max(1, warm.features.num_rows),
        k_total=layout.k_total, kernel_bytes=_kernel_bytes(layout, cfg.index.kernel, cfg.index.max_full_kernel_dim),
        search_rows=search_rows, search_ms=1000 * float(np.median(search)),
        query_featurize_ms=1000 * float(np.median(times)))


class IndexTime(TypedDict):
    rows_per_s_per_device: float
    featurize_seconds: float
    hours: float
    device_hours: float


class Storage(TypedDict):
    bytes_per_row: float
    bytes_per_million_rows: int
    feature_bytes: int
    kernel_bytes: int


class Searchers(TypedDict):
    partitions: int
    rows_per_partition: int
    searcher_memory_bytes: int
    searcher_memory_gb_limit: float


class QueryLatency(TypedDict):
    featurize: float
    search: float
    endpoint_overhead: float
    total: float


class Plan(TypedDict):
    """``attribution plan``: what ``rows`` examples on ``devices`` devices like the calibrated
    one take to index and store, the searchers they need, and a query's latency."""

    rows: int
    devices: int
    calibration: dict[str, Any]
    """``Calibration``'s fields: what was measured, on which device."""
    index: IndexTime
    storage: Storage
    search: Searchers
    query_ms: QueryLatency


def plan(cal: Calibration, rows: int, devices: int, *, searcher_memory_gb: float = 32.0, overhead_ms: float) -> Plan:
    """The plan for ``rows`` examples on ``devices`` devices like the calibrated one;
    ``overhead_ms``: the endpoint's own latency beyond featurize and search."""
    featurize_s = rows / (cal.rows_per_s * devices)
    row_bytes_in_memory = 2 * cal.k_total  # float16 rows, packed as stored
    budget = searcher_memory_gb * 2 ** 30
    partitions = max(1, math.ceil(2 * rows * row_bytes_in_memory / budget))  # twice: old + new version in a swap
    partition_rows = math.ceil(rows / partitions)
    search_ms = cal.search_ms * partition_rows / cal.search_rows
    return Plan(
        rows=rows, devices=devices, calibration=dataclasses.asdict(cal),
        index=IndexTime(rows_per_s_per_device=round(cal.rows_per_s, 2),
                        featurize_seconds=round(featurize_s + cal.startup_seconds, 1),
                        hours=round((featurize_s + cal.startup_seconds) / 3600, 3),
                        device_hours=round(rows / cal.rows_per_s / 3600, 3)),
        storage=Storage(bytes_per_row=round(cal.bytes_per_row, 1), bytes_per_million_rows=round(cal.bytes_per_row * 1e6),
                        feature_bytes=round(cal.bytes_per_row * rows), kernel_bytes=cal.kernel_bytes),
        search=Searchers(partitions=partitions, rows_per_partition=partition_rows,
                         searcher_memory_bytes=2 * partition_rows * row_bytes_in_memory,
                         searcher_memory_gb_limit=searcher_memory_gb),
        query_ms=QueryLatency(featurize=round(cal.query_featurize_ms, 1), search=round(search_ms, 1),
                              endpoint_overhead=overhead_ms,
                              total=round(cal.query_featurize_ms + search_ms + overhead_ms, 1)))


def plan_text(p: Plan) -> str:
    c, ix, st, se, q = p["calibration"], p["index"], p["storage"], p["search"], p["query_ms"]
    gb = 2 ** 30
    return "\n".join([
        f"calibrated on {c['device']}: {c['rows_timed']} examples featurized in batches of {c['batch_size']}, "
        f"k_total {c['k_total']:,}",
        f"index    {ix['rows_per_s_per_device']} rows/s per device -> {p['rows']:,} rows on {p['devices']} device(s): "
        f"{ix['hours']} h ({ix['device_hours']} device-hours)",
        f"storage  {st['bytes_per_row']:,} bytes/row, {st['bytes_per_million_rows'] / gb:.2f} GiB per million rows, "
        f"{st['feature_bytes'] / gb:.2f} GiB for {p['rows']:,} rows (+ kernel {st['kernel_bytes'] / gb:.3f} GiB)",
        f"search   {se['partitions']} partition(s) of {se['rows_per_partition']:,} rows, "
        f"{se['searcher_memory_bytes'] / gb:.2f} GiB per searcher while swapping "
        f"(limit {se['searcher_memory_gb_limit']} GiB)",
        f"query    {q['total']} ms = featurize {q['featurize']} + search {q['search']} + endpoint {q['endpoint_overhead']}",
    ])
