"""The ``attribution`` command line.

    attribution demo --config configs/demo.yaml        the main job on the embedded default
    attribution data synth --out URI --n N             the synthetic subject/style/background set
    attribution train-model --config ... --data URI    train the small text-to-image model
    attribution generate --model DIR --prompt TEXT     sample images, reproducibly
    attribution index --config ... --dataset URI --model DIR --out URI
                                                       featurize a dataset into a versioned index (Ray Data)
    attribution learn-weights --config ... --index URI  per-group weights per aspect (Ray Train)
    attribution serve --config ... --index URI         the HTTP query endpoint (Ray Serve), until Ctrl-C
    attribution reindex --config ...                   scheduled update: incremental index, weights, publish
    attribution plan --rows N --devices G              capacity plan calibrated on this model and machine
    attribution groups --config configs/demo.yaml      tracked layers and parameter groups
    attribution config --reference                     every config key: type, default, what it changes
    attribution model build-tiny --kind text --out DIR a tiny untrained diffusers model
    attribution bench featurize --json                 featurizer throughput and exactness
    attribution bench model-quality --model DIR        attribute accuracy of generated images
    attribution bench index --json                     index throughput, scaling, bytes/example
    attribution bench reindex --json                   dataset bytes a reindex reads after a small addition
    attribution bench weights --json                   weight learning time vs N; aspect Recall@10
    attribution bench serve --json                     endpoint latency and throughput vs N and concurrency
    attribution bench search --json                    exact vs approximate search: latency, recall, memory
    attribution bench scale --json                     every stage on a Stable Diffusion 1.5-sized pipeline

Errors in input or configuration print one line saying what to change and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence

from attribution_core.config import TINY_KINDS, ProjectConfig
from attribution_core.errors import AttributionError
from attribution_core.features.groups import build_layout
from pipelines.commands import bench, config, data, evaluate, generate, index, plan, reindex, serve, train, weights
from pipelines.commands.options import DEFAULT_CONFIG, add_base, add_config, add_json, int_list, positive_int
from pipelines.failures import error_in_traceback, user_error
from pipelines.output import print_result, quiet_libraries, stdout_for_result


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines import demo

    result = demo.run(ProjectConfig.load(args.config), args.config)
    print_result(json.dumps(result, indent=2) if args.json else demo.summary_text(result))
    return 0


def _cmd_groups(args: argparse.Namespace) -> int:
    from pipelines.models import load_model

    cfg = ProjectConfig.load(args.config)
    if args.model:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=args.model, build=None))
    if args.base:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base=args.base))
    adapter = load_model(cfg.model)
    layout = build_layout(adapter.tracked_model(), cfg.featurize.groups, cfg.featurize.projection)
    if args.json:
        print_result(json.dumps(layout.to_manifest(), indent=2))
        return 0
    print(f"{len(layout.layers)} tracked layers, {len(layout.groups)} groups, k_total={layout.k_total}")
    for g in layout.groups:
        print(f"  {g.name:28s} offset={g.offset:<7d} dim={g.dim:<6d} layers={len(g.layers)}")
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from attribution_core.models.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(args.kind, args.out, resolution=args.resolution, widths=args.widths, seed=args.seed)
    print(f"saved a tiny {args.kind!r} model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attribution",
        description="Learned-weight gradient data attribution for diffusion models "
        "(Li et al., arXiv 2506.05647): which training images a generated image drew on.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING; default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the main job end to end on the embedded default",
                       description="Synthesize the dataset, train the small text-to-image model, index the set "
                       "on Ray Data, learn general and aspect weights on Ray Train, evaluate (LDS on retrained subset "
                       "models, aspect Recall@K, HTML report under evaluate.out), then start the query endpoint on "
                       "Ray Serve, send it a generated image, print the answer and shut it down. Steps whose result "
                       "is already there are skipped, so a rerun takes about a minute.")
    add_config(p)
    add_json(p, "the result as JSON")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("groups", help="list the tracked layers and parameter groups of a model",
                       description="Show how featurize.groups in the config splits the model's "
                       "Linear/Conv2d layers into parameter groups, with offsets and sizes.")
    add_config(p)
    p.add_argument("--model", help="model directory (overrides model.path in the config)")
    add_base(p)
    add_json(p, "the layout as JSON (as manifests record it)")
    p.set_defaults(func=_cmd_groups)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("build-tiny", help="save a tiny diffusers model with random weights",
                         description="Build a tiny model from config (no download) and save it in the "
                         "diffusers pipeline layout that every command loads.")
    p.add_argument("--kind", choices=TINY_KINDS, required=True,
                   help="unet: pixel UNet2DModel; unet-class: class-conditional; text: "
                   "UNet2DConditionModel + CLIP text encoder; text-latent: + AutoencoderKL")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--resolution", type=positive_int, default=16, help="image side (default 16)")
    p.add_argument("--widths", type=int_list, default=(32, 64), help="UNet block widths, comma-separated (default 32,64)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.set_defaults(func=_cmd_build_tiny)

    config.add_parser(sub, DEFAULT_CONFIG)
    data.add_parser(sub)
    train.add_parser(sub, DEFAULT_CONFIG)
    generate.add_parser(sub)
    index.add_parser(sub, DEFAULT_CONFIG)
    weights.add_parser(sub, DEFAULT_CONFIG)
    serve.add_parser(sub, DEFAULT_CONFIG)
    evaluate.add_parser(sub, DEFAULT_CONFIG)
    reindex.add_parser(sub, DEFAULT_CONFIG)
    plan.add_parser(sub, DEFAULT_CONFIG)

    bench.add_parser(sub, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    quiet_libraries()
    try:
        if getattr(args, "json", False):  # the result alone on stdout, even when Ray forwards cluster logs
            with stdout_for_result():
                return args.func(args)
        return args.func(args)
    except AttributionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one of ours, wrapped by Ray on its way from a worker?
        found = user_error(exc) or error_in_traceback(str(exc))
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
