"""``attribution generate``: sample images from a model, reproducibly."""

from __future__ import annotations

import argparse
import json

import pyarrow as pa

from attribution_core.data.images import encode_png
from attribution_core.data.writers import write_parquet_dataset
from attribution_core.models.sampling import SCHEDULERS, generate
from attribution_core.seeding import content_id
from pipelines.commands.options import add_base, add_json
from pipelines.models import load_model_dir
from pipelines.output import print_result

SCHEMA = pa.schema([
    ("example_id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()), ("label", pa.int64()),
    ("seed", pa.int64()), ("index", pa.int64()), ("guidance", pa.float64()), ("steps", pa.int64()),
    ("scheduler", pa.string()), ("model", pa.string()),
])


def _run(args: argparse.Namespace) -> int:
    adapter = load_model_dir(args.model, args.device, args.base)
    images = generate(adapter, prompts=args.prompt or None, labels=args.label or None, n=args.n, seed=args.seed,
                      guidance=args.guidance, steps=args.steps, scheduler=args.scheduler)
    rows = []
    for im in images:
        png = encode_png(im.image)
        rows.append({"example_id": content_id(png), "image": png, "prompt": im.prompt, "label": im.label,
                     "seed": im.seed, "index": im.index, "guidance": args.guidance, "steps": args.steps,
                     "scheduler": args.scheduler, "model": str(args.model)})
    meta = {"kind": "generated", "model": str(args.model), "seed": args.seed, "n": args.n}
    count = write_parquet_dataset(args.out, rows, SCHEMA, meta)
    summary = {"out": args.out, "images": count, "prompts": args.prompt, "seed": args.seed}
    print_result(json.dumps(summary, indent=2) if args.json else f"wrote {count} images to {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="sample images from a model",
        description="Sample images with DDIM or DDPM and classifier-free guidance and write them as Parquet "
        "with their prompt, seed and index: image i of a call is regenerated exactly by the same "
        "(model, prompt, seed, i, guidance, steps, scheduler).",
    )
    p.add_argument("--model", required=True, help="model directory: a diffusers pipeline, or a LoRA folder (with --base)")
    add_base(p, "the base its lora.json names")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable; images cycle through them)")
    p.add_argument("--label", action="append", type=int, default=[], help="class label for class-conditional models")
    p.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim", help="sampler (default ddim)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", required=True, help="output folder: a path or s3://bucket/prefix")
    add_json(p)
    p.set_defaults(func=_run)
