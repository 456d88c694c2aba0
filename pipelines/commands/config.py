"""``attribution config``: the configuration reference, or a config file with every default filled in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from attribution_core.config import ProjectConfig, to_mapping
from attribution_core.config_reference import reference_markdown
from pipelines.commands.options import add_config, add_json
from pipelines.output import print_result


def _run(args: argparse.Namespace) -> int:
    if args.reference:
        text = reference_markdown()
    else:
        resolved = to_mapping(ProjectConfig.load(args.config))
        text = (json.dumps(resolved, indent=2) if args.json else yaml.safe_dump(resolved, sort_keys=False)) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print_result(text.rstrip("\n"))
    return 0


def add_parser(sub: argparse._SubParsersAction, default_config: str) -> None:
    p = sub.add_parser(
        "config", help="the configuration reference, or a config with its defaults filled in",
        description="With --reference: every key of a config file with its type, default and what it changes, "
        "read from the code (the text of docs/CONFIG.md). Without: the config file --config as the jobs read it, "
        "every key it leaves out filled in with its default, after validation (a bad value is one error line).")
    add_config(p, default_config)
    p.add_argument("--reference", action="store_true", help="print the reference of every key (Markdown)")
    add_json(p, "the resolved config as JSON (not YAML)")
    p.add_argument("--out", help="write to this file instead of printing (e.g. docs/CONFIG.md)")
    p.set_defaults(func=_run)
