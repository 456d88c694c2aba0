"""``attribution plan``: hours, storage, searchers and latency for N rows on G devices."""

from __future__ import annotations

import argparse
import json

from attribution_core.config import ProjectConfig
from pipelines.commands.options import add_config, add_json, positive_float, positive_int
from pipelines.output import print_result

#: The endpoint's own latency beyond featurize + search: the p50 of `attribution bench serve`
#: over its standalone floor (README, "How large a cluster").
ENDPOINT_OVERHEAD_MS = 45.4


def _run(args: argparse.Namespace) -> int:
    from pipelines.capacity import calibrate, plan, plan_text

    cfg = ProjectConfig.load(args.config)
    result = plan(calibrate(cfg, batches=args.batches, search_rows=args.search_rows), args.rows, args.devices,
                  searcher_memory_gb=args.searcher_memory_gb, overhead_ms=args.overhead_ms)
    print_result(json.dumps(result, indent=2) if args.json else plan_text(result))
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "plan", help="capacity plan: index hours, storage, searchers and query latency for N rows on G devices",
        description="Calibrate on the config's model and this machine's device (featurize a few batches of "
        "index.batch_size with the configured groups, timesteps and projection, write one shard, featurize a "
        "query, time searches over synthetic rows of the real width), then scale to --rows on --devices like it: "
        "rows/s per device, hours to index, bytes per row and per million rows, searcher partitions and memory, "
        "and the expected query latency. No Ray is started. A CPU device is one index actor with "
        "index.threads_per_actor threads (default 1).")
    add_config(p, default_config, "the model, featurize, index and serve settings to plan for")
    p.add_argument("--rows", type=positive_int, required=True, help="examples to index")
    p.add_argument("--devices", type=positive_int, default=1, help="GPUs (or CPU actors) indexing (default 1)")
    p.add_argument("--batches", type=positive_int, default=3, help="timed calibration batches (default 3)")
    p.add_argument("--search-rows", type=positive_int, default=20_000,
                   help="synthetic rows the search is timed over (default 20000)")
    p.add_argument("--searcher-memory-gb", type=positive_float, default=32.0,
                   help="memory of one searcher replica, for the partition count (default 32)")
    p.add_argument("--overhead-ms", type=float, default=ENDPOINT_OVERHEAD_MS,
                   help=f"the endpoint's own latency beyond featurize and search (default {ENDPOINT_OVERHEAD_MS}, as "
                   "`attribution bench serve` measured it on 2 CPUs; measure yours)")
    add_json(p, "the plan as one JSON object")
    p.set_defaults(func=_run)
