"""``attribution index``: build or update the attribution index of a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json

from attribution_core.config import ProjectConfig
from pipelines.commands.options import add_base, add_config, add_json, add_ray_address
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    from pipelines.index.job import IndexRequest, run_index

    cfg = ProjectConfig.load(args.config)
    overrides = {k: v for k, v in (("actors", args.actors), ("batch_size", args.batch_size)) if v is not None}
    if overrides:
        cfg = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, **overrides))
    mode = "incremental" if args.incremental else "full" if args.full else "auto"
    req = IndexRequest(dataset=args.dataset or cfg.data.uri, model=args.model or cfg.model.path,
                       out=args.out or cfg.index.out, mode=mode, ray_address=args.ray_address,
                       base=args.base or cfg.model.base)
    result = run_index(cfg, req)
    if args.json:
        print_result(json.dumps(result, indent=2))
    elif result["up_to_date"]:
        print(f"index {result['uri']} is up to date: version {result['version']}, {result['rows']} rows, "
              f"{result['errors']} quarantined")
    else:
        print(f"committed {result['uri']} version {result['version']} ({result['mode']}): {result['rows']} rows, "
              f"{result['errors']} quarantined, {result['featurized']} featurized in {result['seconds']} s "
              f"({result['rows_per_s']} rows/s), {result['bytes_per_example']} bytes/example")
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "index", help="featurize a dataset into a versioned attribution index (Ray Data)",
        description="Read a dataset (Parquet with image bytes, an image folder with metadata.jsonl, or one "
        "sub-folder of images per class; a path or s3:// URI), featurize every example with the model on Ray "
        "Data actors, and write a new "
        "immutable index version: Parquet feature shards, an errors/ table of quarantined examples, the "
        "Gram matrix and kernel, and the manifest (last), then move the index's `latest` pointer. "
        "A crashed run resumes when the same command is run again. When the latest version used the "
        "same model and featurize settings, only new and changed examples are featurized. Captions and "
        "labels are read from the columns the model's recipe names (its training.json, else the train "
        "section); a build that quarantines more than index.max_quarantine_fraction of the dataset is "
        "not committed and says why.",
    )
    add_config(p, default_config)
    p.add_argument("--dataset", help="dataset URI (default: data.uri of the config)")
    p.add_argument("--model", help="model directory: a diffusers pipeline, or a LoRA folder (default: model.path of the config)")
    add_base(p)
    p.add_argument("--out", help="index root, a path or s3://bucket/prefix (default: index.out of the config)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--incremental", action="store_true",
                      help="require an incremental update of the latest version; refuse if it was built "
                      "with another model or featurize settings")
    mode.add_argument("--full", action="store_true", help="featurize everything even if the latest version matches")
    p.add_argument("--actors", type=int, help="featurizing actors (default: index.actors; 0 = automatic)")
    p.add_argument("--batch-size", type=int, help="examples per actor call and shard (default: index.batch_size)")
    add_ray_address(p)
    add_json(p, "a JSON summary: version, rows, errors, seconds, rows_per_s, bytes_per_example, uri")
    p.set_defaults(func=_run)
