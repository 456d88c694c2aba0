"""``attribution reindex``: the scheduled update (incremental index, weights, publish)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from attribution_core.config import ProjectConfig
from pipelines.commands.options import add_base, add_config, add_json, add_ray_address
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    from pipelines.reindex.job import ReindexRequest, reindex

    cfg = ProjectConfig.load(args.config)
    overrides = {k: v for k, v in (("relearn", args.relearn), ("relearn_fraction", args.relearn_fraction),
                                   ("endpoint", args.endpoint), ("lease_ttl_s", args.lease_ttl)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, reindex=dataclasses.replace(cfg.reindex, **overrides))
    summary = reindex(cfg, ReindexRequest(dataset=args.dataset, model=args.model, base=args.base, index=args.index,
                                          ray_address=args.ray_address, full=args.full))
    if args.json:
        print_result(json.dumps(summary, indent=2))
    else:
        print(summary_text(summary), flush=True)
    return 0


def summary_text(s: dict) -> str:
    if s["status"] == "skipped":
        return f"reindex skipped: {s['reason']}"
    lines = [f"{s['index']}: {s['status']} {s['version_after']} (was {s['version_before']}); {s['rows']} rows, "
             f"{s['rows_added']} added, {s['rows_changed']} changed, {s['rows_removed']} removed "
             f"({s['changed_fraction']:.1%}), {s['errors']} quarantined",
             f"weights: {'learned' if s['weights']['learned'] else 'kept'} ({s['weights']['reason']}): "
             f"{s['weights']['artifact']}"]
    if "endpoint" in s:
        lines.append(f"endpoint {s['endpoint']['url']} serves {s['endpoint']['serving']} "
                     f"{s['endpoint']['swapped_after_s']} s after publishing")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in s["stage_seconds"].items()) + f"; total {s['seconds']}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "reindex", help="scheduled update: incremental index, weights, then publish to running endpoints",
        description="The command a scheduler runs (a Kubernetes CronJob, a RayJob, cron). Under a lease on the "
        "index root it featurizes only new and changed examples into a new index version (Ray Data), recomputes "
        "the kernel, learns weights again when reindex.relearn says so (Ray Train), then moves the index's "
        "`latest` pointer; endpoints serving the latest version hot-swap to it within serve.refresh_s without a "
        "restart. A run that overlaps another exits at once with status 'skipped' and exit code 0, naming the "
        "holder (a lease left by a dead run expires after reindex.lease_ttl_s). Running it again after a crash "
        "finishes the same version; running it with nothing new changes nothing.",
    )
    add_config(p, default_config, more="its data:, model:, index:, weights: and reindex: sections apply")
    p.add_argument("--dataset", help="dataset URI (default: data.uri of the config)")
    p.add_argument("--model", help="model directory: a diffusers pipeline, or a LoRA folder (default: model.path of the config)")
    add_base(p)
    p.add_argument("--index", help="index root, a path or s3://bucket/prefix (default: index.out of the config)")
    p.add_argument("--full", action="store_true",
                   help="featurize every example again instead of only new and changed ones (the full build; "
                   "needed only to start over, a model change is detected by itself)")
    p.add_argument("--relearn", choices=("always", "changed"),
                   help="learn weights for every new version, or only past --relearn-fraction (default: reindex.relearn)")
    p.add_argument("--relearn-fraction", type=float,
                   help="share of rows added+changed+removed above which weights are learned again "
                   "(default: reindex.relearn_fraction)")
    p.add_argument("--endpoint", help="base URL of a running endpoint to wait for after publishing "
                   "(default: reindex.endpoint)")
    p.add_argument("--lease-ttl", type=float, help="seconds a lease outlives its last renewal (default: "
                   "reindex.lease_ttl_s)")
    add_ray_address(p, in_job=True)
    add_json(p, "the summary as JSON: status, version_before/after, rows_added/changed/removed, weights, "
                "stage_seconds")
    p.set_defaults(func=_run)
