"""``attribution bench model-quality``: does the model draw the prompted attributes?

Trains an attribute classifier on the model's real training images, generates images for
attribute combinations seen in training (held in) and for the dataset's held-out
combinations, and prints how often the classifier reads back the prompted subject, style
and background.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from attribution_core.data.loading import load_dataset
from attribution_core.data.synthetic import BACKGROUNDS, STYLES, SUBJECTS, is_held_out
from attribution_core.data.writers import read_marker
from attribution_core.errors import ConfigError
from attribution_core.evaluation.quality import ATTRIBUTES, model_quality, train_classifier
from pipelines.models import load_model_dir
from pipelines.output import print_result


def _combos(uri: str, attrs: dict[str, list], max_combos: int, seed: int) -> tuple[list[dict], list[dict]]:
    missing = [a for a in ATTRIBUTES if a not in attrs]
    if missing:
        raise ConfigError(f"dataset {uri!r} has no {', '.join(missing)} column(s); model-quality needs subject, "
                          "style and background labels (the synthetic set has them)")
    seen = sorted({tuple(str(attrs[a][i]) for a in ATTRIBUTES) for i in range(len(attrs["subject"]))})
    rng = random.Random(seed)
    held_in = [dict(zip(ATTRIBUTES, c)) for c in rng.sample(seen, min(max_combos, len(seen)))]
    marker = read_marker(uri) or {}
    holdout = tuple(tuple(entry.items()) for entry in marker.get("holdout", []))
    every = [dict(subject=s, style=t, background=b) for s in SUBJECTS for t in STYLES for b in BACKGROUNDS]
    held_out = [c for c in every if is_held_out(c, holdout)]
    held_out = rng.sample(held_out, min(max_combos, len(held_out)))
    return held_in, held_out


def main(args: argparse.Namespace) -> int:
    info_path = Path(args.model) / "training.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    data_uri = args.data or info.get("data")
    if not data_uri:
        raise ConfigError(f"{args.model} has no training.json naming its data; pass --data URI")
    start = time.perf_counter()
    adapter = load_model_dir(args.model, args.device, args.base)
    if adapter.conditioning != "text":
        raise ConfigError("model-quality prompts by caption; this model is not text-conditioned")
    channels, resolution = adapter.image_shape[0], adapter.image_shape[1]
    data = load_dataset(data_uri, resolution, channels)
    held_in, held_out = _combos(data_uri, data.attributes, args.combos, args.seed)
    attrs = {a: [str(v) for v in data.attributes[a]] for a in ATTRIBUTES}
    classifier = train_classifier(data.pixels, attrs, epochs=args.classifier_epochs, seed=args.seed)
    result = model_quality(adapter, classifier, held_in, held_out, per_combo=args.per_combo, guidance=args.guidance,
                           steps=args.steps, seed=args.seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["model"] = str(args.model)
    if args.json:
        print_result(json.dumps(result, indent=2))
    else:
        print(f"n={result['n']}  " + "  ".join(f"{a}={result[a]:.3f}" for a in ATTRIBUTES)
              + f"  (classifier on real images: {result['classifier_real_accuracy']})")
    return 0
