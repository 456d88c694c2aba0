"""``attribution learn-weights``: learn per-group weights (general and per aspect) on an index."""

from __future__ import annotations

import argparse
import json

from attribution_core.config import ProjectConfig
from pipelines.commands.options import add_base, add_config, add_json, add_ray_address
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    from pipelines.weights.job import WeightsRequest, learn_weights

    cfg = ProjectConfig.load(args.config)
    aspects = tuple(a.strip() for a in args.aspects.split(",")) if args.aspects else None
    req = WeightsRequest(index=args.index or cfg.index.out, version=args.version, model=args.model,
                         base=args.base, aspects=aspects, ray_address=args.ray_address)
    result = learn_weights(cfg, req)
    if args.json:
        print_result(json.dumps(result, indent=2))
        return 0
    print(f"learned weights on {result['index']} version {result['version']} from {result['queries']} queries in "
          f"{result['rounds']} round(s), {result['seconds']} s; wrote {result['artifact']}")
    for aspect, info in result["aspects"].items():
        top = sorted(info["weights"].items(), key=lambda kv: -kv[1])[:4]
        print(f"  {aspect:10s} pool recall {info['pool_recall']['mean']:.3f}  "
              + ", ".join(f"{g} {w:.3f}" for g, w in top))
        if info["shrinkage"]:
            moved = info["shrinkage"]
            print(f"  {'':10s} moved {moved['a']:g} of the way from uniform (held-out objective over "
                  f"{moved['queries']} queries: " + ", ".join(f"{a:g}: {v:.4f}" for a, v in moved["objective"].items())
                  + ")")
        if info["validation"]:
            v = info["validation"]
            print(f"  {'':10s} validation Recall@{v['k']} over {v['queries']} queries: "
                  + ", ".join(f"{name} {r:.3f}" for name, r in v["recall"].items())
                  + f" -> answered by {info['answered_by']}")
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "learn-weights", help="learn per-group attribution weights on an index (Ray Data + Ray Train)",
        description="Generate learning queries with the index's model (training captions for 'general', the "
        "config's templates for subject/style/background), scan the index for candidate pools and noise "
        "moments, and minimise the self-supervised objective -mean(top-k tau_w)/||tau_w|| + lambda_w ||w||^2 "
        "over w = softmax(theta) on Ray Train; rescan to verify the pools and repeat. Where the dataset has a "
        "column per aspect, validation queries (weights.validation_queries) choose which weighting answers each "
        "aspect: its own weights, the general ones or uniform; before that, held-out learning queries "
        "(weights.holdout_queries) choose how far each aspect's weights move from uniform. Writes <index>/versions/<version>/weights/<name>.json.",
    )
    add_config(p, default_config)
    p.add_argument("--index", help="index root (default: index.out of the config)")
    p.add_argument("--version", help="index version (default: the latest)")
    p.add_argument("--model", help="model directory (default: the path recorded in the index manifest)")
    add_base(p, "the base recorded in the index manifest")
    p.add_argument("--aspects", help="comma-separated: general,subject,style,background (default: weights.aspects)")
    add_ray_address(p)
    add_json(p)
    p.set_defaults(func=_run)
