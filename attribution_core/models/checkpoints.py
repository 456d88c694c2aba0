"""Checkpoints a model trained here keeps beside it (``train_to_dir(..., checkpoints=C)``):
the EMA weights at evenly spaced steps, each a pipeline directory of its own, for attribution
methods that sum over training (TracIn-CP; TRAK's ensembles)."""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINTS = "checkpoints"


def checkpoint_dir(model_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` of the model at ``model_dir`` is kept."""
    return Path(model_dir) / CHECKPOINTS / f"step-{step:07d}"


def model_checkpoints(model_dir: str | Path) -> list[tuple[int, float, Path]]:
    """``(step, learning rate, pipeline dir)`` of every checkpoint a model trained here kept,
    the model itself last; just the model (step and rate unknown: 0, 1.0) without a record."""
    root = Path(model_dir)
    info_file = root / "training.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    found = []
    for folder in sorted((root / CHECKPOINTS).glob("step-*")) if info.get("checkpoints", 1) > 1 else []:
        record = json.loads((folder / "training.json").read_text())
        found.append((int(folder.name.split("-")[1]), float(record["learning_rate"]), folder))
    return [*found, (int(info.get("steps", 0)), float(info.get("learning_rate", 1.0)), root)]
