"""LDS ground truth: one model retrained per training subset, as parallel Ray tasks, each
measured on the evaluation queries. Results are cached per subset under
``<cache>/ground_truth/<key>/`` (``key`` = recipe + subsets + queries), so an interrupted
run resumes and an unchanged rerun trains nothing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import ray
import torch

from attribution_core.config import FeaturizeConfig, TrainConfig, from_mapping, to_mapping
from attribution_core.data.loading import TrainingData
from attribution_core.evaluation.metrics import ground_truth_key
from attribution_core.evaluation.outputs import model_outputs
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.recipe import recipe_identity
from attribution_core.models.training import train_model

log = logging.getLogger(__name__)


def retrain_and_measure(data: TrainingData, keep: np.ndarray, recipe: dict[str, Any], queries: ExampleBatch,
                        *, featurize: dict[str, Any]) -> np.ndarray:
    """Train ``recipe`` on ``data`` restricted to ``keep`` (bool [N]) and return its outputs
    on ``queries`` (``model_outputs``), float64 [Q]."""
    cfg = from_mapping(TrainConfig, recipe)
    model = train_model(data.subset(torch.from_numpy(np.flatnonzero(keep))), cfg)
    return model_outputs(model.adapter, queries, from_mapping(FeaturizeConfig, featurize)).numpy()


class CachedRuns(TypedDict):
    """Where the retrained models' outputs are cached, under which key, and how many were trained now."""

    key: str
    trained: int
    cached: int
    seconds: float
    folder: str


class GroundTruth(CachedRuns):
    outputs: np.ndarray
    """``[Q, S]``: each query's output under the model retrained on each subset."""


def ground_truth(data: TrainingData, masks: np.ndarray, recipe: TrainConfig, queries: ExampleBatch,
                 *, featurize: FeaturizeConfig, cache: str | Path, gpus_per_task: float = 0.0) -> GroundTruth:
    """``[Q, S]`` outputs of the models retrained on each subset (``masks [S, N]``), cached."""
    recipe_map, featurize_map = to_mapping(recipe), to_mapping(featurize)
    # Only what changes the outputs keys the cache (not groups or projection of the features).
    output = {k: featurize_map[k] for k in ("measurement", "timesteps", "noise_draws", "seed")}
    key = ground_truth_key({"recipe": recipe_identity(recipe), "output": output, "examples": data.example_ids},
                           masks, list(queries.example_ids))
    folder = Path(cache) / "ground_truth" / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps({"recipe": recipe_map, "output": output,
                                                 "subsets": int(masks.shape[0]), "queries": len(queries)}, indent=2))
    started = time.perf_counter()
    missing = [s for s in range(masks.shape[0]) if not (folder / f"subset-{s:04d}.npy").is_file()]
    if missing:
        log.info("retraining %d of %d subset models (%s)", len(missing), masks.shape[0], folder)
        task = ray.remote(retrain_and_measure).options(num_cpus=max(1, recipe.threads or 1), num_gpus=gpus_per_task,
                                                       max_retries=2)
        data_ref, queries_ref = ray.put(data), ray.put(queries)
        pending = {task.remote(data_ref, masks[s], recipe_map, queries_ref, featurize=featurize_map): s for s in missing}
        done = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            s = pending.pop(ready[0])
            out = ray.get(ready[0])
            tmp = folder / f".subset-{s:04d}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, out)
            tmp.rename(folder / f"subset-{s:04d}.npy")  # a crash never leaves a partial result
            done += 1
            log.info("subset %d done (%d/%d, %.0f s)", s, done, len(missing), time.perf_counter() - started)
    outputs = np.stack([np.load(folder / f"subset-{s:04d}.npy") for s in range(masks.shape[0])], axis=1)
    return GroundTruth(outputs=outputs, key=key, trained=len(missing), cached=masks.shape[0] - len(missing),
                       seconds=round(time.perf_counter() - started, 1), folder=str(folder))
