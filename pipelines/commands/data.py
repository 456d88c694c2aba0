"""``attribution data synth``: write a synthetic dataset (shapes with captions, or textures with labels)."""

from __future__ import annotations

import argparse
import json

from attribution_core.data.textures import TEXTURES
from attribution_core.data.writers import write_synthetic
from attribution_core.errors import ConfigError
from attribution_core.synthetic_vocabulary import BACKGROUNDS, STYLES, SUBJECTS
from pipelines.commands.options import add_json
from pipelines.output import print_result


def parse_holdout(specs: list[str]) -> tuple[tuple[tuple[str, str], ...], ...]:
    """``["subject=ring,style=striped", ...]`` -> holdout entries."""
    entries = []
    for spec in specs:
        pairs = []
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError(f"--holdout {spec!r}: write attribute=value pairs joined by commas, "
                                  "e.g. subject=ring,style=striped")
            pairs.append((key.strip(), value.strip()))
        entries.append(tuple(pairs))
    return tuple(entries)


def _run(args: argparse.Namespace) -> int:
    result = write_synthetic(args.out, args.n, args.seed, size=args.size, holdout=parse_holdout(args.holdout),
                             rows_per_file=args.rows_per_file,
                             kind=args.kind)
    if args.json:
        print_result(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['rows']} examples ({args.size}x{args.size}) to {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = data.add_parser(
        "synth", help="write a synthetic dataset (shapes with captions, or labelled textures)",
        description=f"--kind shapes (default): draw N images with known subject ({', '.join(SUBJECTS)}), style "
        f"({', '.join(STYLES)}) and background ({', '.join(BACKGROUNDS)}), each with random colour, position and "
        "scale, written as Parquet (example_id, image PNG bytes, caption, subject, style, background). "
        f"--kind textures: N texture photographs in classes ({', '.join(TEXTURES)}) at random orientation, "
        "frequency and colours under uneven light and noise, written as Parquet (example_id, image, label), for a "
        "class-conditional model. Deterministic from --seed.",
    )
    p.add_argument("--kind", choices=("shapes", "textures"), default="shapes", help="which set (default shapes)")
    p.add_argument("--out", required=True, help="output folder: a path or s3://bucket/prefix")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--holdout", action="append", default=[], metavar="ATTR=VALUE[,ATTR=VALUE]",
                   help="hold out a combination, e.g. subject=ring,style=striped (repeatable)")
    p.add_argument("--rows-per-file", type=int, default=4096, help="rows per Parquet file (default 4096)")
    add_json(p)
    p.set_defaults(func=_run)
