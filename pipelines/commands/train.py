"""``attribution train-model``: train the small text-to-image model on a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from attribution_core.config import ProjectConfig
from attribution_core.errors import ConfigError
from attribution_core.models.training_dir import train_to_dir
from pipelines.commands.options import add_config, add_json
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    project = ProjectConfig.load(args.config)
    cfg = project.subset_train if args.recipe == "subset" else project.train
    if cfg is None:
        raise ConfigError(f"{args.config} has no subset_train section; add one (see configs/demo.yaml) or use --recipe train")
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.base is not None or args.lora is not None:
        if args.base is None or args.lora is None:
            raise ConfigError("a LoRA fine-tune needs both --base (the pipeline directory to fine-tune) and --lora RANK")
        cfg = dataclasses.replace(cfg, base=args.base, lora_rank=args.lora)
    if args.lora_targets is not None:
        if not cfg.lora:
            raise ConfigError("--lora-targets needs --base and --lora (or base and lora_rank in the recipe)")
        cfg = dataclasses.replace(cfg, lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    if cfg.lora:
        from pipelines.steps import ensure_base

        ensure_base(project)  # the config's base section, trained first when missing
    out = Path(args.out or project.model.path)
    if out.exists():
        if not args.overwrite:
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
        shutil.rmtree(out)
    result = train_to_dir(args.data or project.data.uri, cfg, out, read_options={
        "image_column": project.data.image_column, "id_column": project.data.id_column})
    lora = f"LoRA rank {result['lora_rank']} on {cfg.base}: " if cfg.lora else ""
    print_result(json.dumps(result, indent=2) if args.json else
          f"{lora}trained {result['steps']} steps of {result['trainable_parameters']:,} parameters in "
          f"{result['seconds']} s ({result['steps_per_s']} steps/s), final loss {result['final_loss']}; "
          f"saved to {result['out']}")
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "train-model", help="train the small diffusion model on a dataset",
        description="Train the recipe in the config's `train` section (or `subset_train`) on a Parquet or "
        "image-folder dataset and save a diffusers pipeline directory that every stage loads. With --base and "
        "--lora, fine-tune an existing pipeline with LoRA adapters (peft, as diffusers' LoRA scripts do) and save "
        "them as a LoRA directory that every stage loads as base + adapters.",
    )
    add_config(p, default_config)
    p.add_argument("--data", help="dataset URI (default: data.uri of the config)")
    p.add_argument("--out", help="model directory to write (default: model.path of the config)")
    p.add_argument("--recipe", choices=("train", "subset"), default="train",
                   help="which recipe section: train (default) or subset (the evaluation's subset models)")
    p.add_argument("--steps", type=int, help="override the number of optimisation steps")
    p.add_argument("--seed", type=int, help="override the training seed")
    p.add_argument("--base", metavar="DIR",
                   help="fine-tune this pipeline directory with LoRA adapters instead of training from scratch "
                        "(needs --lora); the output is a LoRA directory: pytorch_lora_weights.safetensors + lora.json")
    p.add_argument("--lora", type=int, metavar="RANK", help="rank of the LoRA adapters (with --base)")
    p.add_argument("--lora-targets", metavar="A,B,...",
                   help="comma-separated module-name suffixes that get adapters (default to_q,to_k,to_v,to_out.0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    add_json(p)
    p.set_defaults(func=_run)
