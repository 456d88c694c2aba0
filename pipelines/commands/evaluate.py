"""``attribution evaluate``: LDS and aspect Recall@K side by side, and the HTML report."""

from __future__ import annotations

import argparse
import json

from attribution_core.config import ProjectConfig
from attribution_core.errors import ConfigError
from pipelines.commands.options import add_config, add_json, add_ray_address
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    from pipelines.evaluation.job import EvaluateRequest, evaluate
    from pipelines.evaluation.summary import summary_text

    cfg = ProjectConfig.load(args.config)
    parts = {"lds": not args.skip_lds, "recall": not args.skip_recall, "exemplars": not args.skip_exemplars}
    if args.only:
        parts = {name: name == args.only for name in parts}
    if parts["exemplars"] and args.only == "exemplars" and cfg.evaluate.exemplars is None:
        raise ConfigError("--only exemplars: the config has no evaluate.exemplars section; add one naming the data "
                          "columns to draw sets from (columns: {subject: subject}) or a folder of sets (folder: path)")
    if not any(parts.values()):
        raise ConfigError("nothing to evaluate: every part is skipped")
    metrics = evaluate(cfg, EvaluateRequest(ray_address=args.ray_address, **parts))
    print_result(json.dumps(metrics, indent=2) if args.json else summary_text(metrics))
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "evaluate", help="measure attribution quality: LDS (retrained subsets) and aspect Recall@K; HTML report",
        description="Run (or find done) the dataset, model, index and learned-weights steps of the config, then "
        "measure side by side: the linear datamodeling score of TracIn-CP (loss, K = I, over the universe model's "
        "evaluate.checkpoints), TRAK (loss, kernel), D-TRAK (square, kernel) and DAS-style (output mean, kernel, "
        "residual scale), each with uniform and learned weights, against models retrained on evaluate.subsets random "
        "subsets (parallel Ray tasks, a GPU each when present; cached by recipe, subsets and queries), every interval "
        "resampling queries and subsets; which weighting LDS says to serve per basis (uniform unless learned is "
        "significantly better; written into the served index's 'general' choice); optionally the noise ceiling "
        "(evaluate.noise_ceiling), D-TRAK and DAS as published with the weighting paper's setting "
        "(evaluate.published) and the featurizer's quality/cost frontier (evaluate.frontier); and Recall@K of "
        "subject / style / background for generated queries under aspect, general and uniform weights and a pixel "
        "nearest-neighbour baseline; and the exemplar check (evaluate.exemplars): the model fine-tuned briefly with "
        "LoRA on each small exemplar set under a new word, its images for that word attributed among the exemplars "
        "and a sample of training rows, Recall@K and mAP per set kind for every weighting served, the contrastive "
        "query, pixel kNN and a control without the customization (no retraining: minutes, on any model). Writes metrics.json, lds_per_query.json and a self-contained report.html under "
        "evaluate.out and prints the tables (or the JSON).",
    )
    add_config(p, default_config, more="configs/benchmark.yaml is the full-size benchmark")
    p.add_argument("--skip-lds", action="store_true", help="no LDS (no retraining)")
    p.add_argument("--skip-recall", action="store_true", help="no aspect Recall@K")
    p.add_argument("--skip-exemplars", action="store_true", help="no exemplar check (evaluate.exemplars)")
    p.add_argument("--only", choices=("lds", "recall", "exemplars"),
                   help="run one part alone; `--only exemplars` is the check of your own model: no retraining, "
                   "no caption attributes needed")
    add_ray_address(p)
    add_json(p, "metrics.json")
    p.set_defaults(func=_run)
