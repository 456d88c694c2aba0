"""LDS ground truth on Ray: subset models retrained in parallel tasks, cached per subset."""

from __future__ import annotations

import numpy as np

import torch

from attribution_core.config import FeaturizeConfig, TrainConfig, from_mapping, to_mapping
from attribution_core.data.loading import load_dataset
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.evaluation.metrics import subset_masks
from attribution_core.models.adapters import ExampleBatch
from pipelines.evaluation.groundtruth import ground_truth, retrain_and_measure

RECIPE = from_mapping(TrainConfig, {"resolution": 16, "channels": 3, "widths": [8, 16], "layers_per_block": 1,
                                    "conditioning": "text", "text_width": 16, "text_layers": 1,
                                    "max_caption_tokens": 8, "steps": 4, "batch_size": 4, "warmup_steps": 1,
                                    "threads": 1, "seed": 0})
FEATURIZE = from_mapping(FeaturizeConfig, {"measurement": "square", "timesteps": {"count": 2, "strategy": "uniform"}})


def test_subset_models_are_retrained_in_parallel_and_reused(tmp_path, ray_cluster):
    uri = str(tmp_path / "data")
    write_parquet_dataset(uri, list(synthetic_rows(16, seed=6, size=16)), SYNTH_SCHEMA, {"kind": "test"})
    data = load_dataset(uri, 16, 3, conditioning="text")
    queries_data = data.subset(torch.arange(3))
    queries = ExampleBatch(example_ids=tuple(f"q-{i}" for i in queries_data.example_ids), pixels=queries_data.pixels,
                           captions=tuple(queries_data.captions))
    masks = subset_masks(16, 3, seed=1)
    first = ground_truth(data, masks, RECIPE, queries, featurize=FEATURIZE, cache=tmp_path / "cache")
    assert first["outputs"].shape == (3, 3) and first["trained"] == 3 and first["cached"] == 0
    # Each subset's model is its own: different training data, different outputs.
    assert len({tuple(np.round(first["outputs"][:, s], 12)) for s in range(3)}) == 3
    # The task's result is what training that subset here gives.
    here = retrain_and_measure(data, masks[1], to_mapping(RECIPE), queries, featurize=to_mapping(FEATURIZE))
    np.testing.assert_allclose(first["outputs"][:, 1], here, rtol=1e-5)
    again = ground_truth(data, masks, RECIPE, queries, featurize=FEATURIZE, cache=tmp_path / "cache")
    assert again["trained"] == 0 and again["cached"] == 3 and again["key"] == first["key"]
    np.testing.assert_array_equal(again["outputs"], first["outputs"])
    other = ground_truth(data, subset_masks(16, 3, seed=2), RECIPE, queries, featurize=FEATURIZE,
                         cache=tmp_path / "cache")
    assert other["key"] != first["key"] and other["trained"] == 3
