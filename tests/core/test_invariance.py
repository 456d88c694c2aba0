"""Features of an example do not depend on its batch, batch size, position, chunking or
process: all randomness is keyed by (seed, example_id, draw)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from attribution_core.config import FeaturizeConfig, TimestepConfig
from attribution_core.features.featurize import Featurizer, featurize
from tests.conftest import make_batch

CFG = FeaturizeConfig(timesteps=TimestepConfig(count=3, strategy="random"), noise_draws=2, seed=3)
TOL = dict(rtol=1e-5, atol=1e-6)


def _by_id(batch, flat):
    return {eid: flat[i] for i, eid in enumerate(batch.example_ids)}


def test_batch_size_order_and_composition(adapters):
    adapter = adapters["text"]
    featurizer = Featurizer(adapter, CFG)
    batch = make_batch(adapter, n=6)
    whole = _by_id(batch, featurizer.flat(batch))
    # Reversed order.
    rev = batch.select(0, 6)
    order = list(reversed(range(6)))
    rev = type(batch)(tuple(rev.example_ids[i] for i in order), rev.pixels[order],
                      tuple(rev.captions[i] for i in order))
    for eid, value in _by_id(rev, featurizer.flat(rev)).items():
        torch.testing.assert_close(value, whole[eid], **TOL)
    # One at a time, and in a batch with different neighbours.
    for i in range(6):
        single = batch.select(i, i + 1)
        torch.testing.assert_close(featurizer.flat(single)[0], whole[single.example_ids[0]], **TOL)
    other = make_batch(adapter, n=2, seed=99, prefix="other")
    mixed = type(batch)(batch.example_ids[:2] + other.example_ids, torch.cat([batch.pixels[:2], other.pixels]),
                        batch.captions[:2] + other.captions)
    got = _by_id(mixed, featurizer.flat(mixed))
    for eid in batch.example_ids[:2]:
        torch.testing.assert_close(got[eid], whole[eid], **TOL)


def test_chunking_by_max_rows_per_pass(adapters):
    adapter = adapters["unet-class"]
    batch = make_batch(adapter, n=5)
    big = Featurizer(adapter, CFG).flat(batch)
    small = Featurizer(adapter, FeaturizeConfig(**{**CFG.__dict__, "max_rows_per_pass": 7})).flat(batch)
    torch.testing.assert_close(small, big, **TOL)


def test_example_id_changes_the_draws(adapters):
    adapter = adapters["unet"]
    batch = make_batch(adapter, n=1)
    renamed = type(batch)(("another-id",), batch.pixels)
    featurizer = Featurizer(adapter, CFG)
    assert not torch.allclose(featurizer.flat(batch), featurizer.flat(renamed))


def test_featurize_function_matches_featurizer_and_groups(adapters):
    adapter = adapters["text-latent"]
    batch = make_batch(adapter, n=2)
    featurizer = Featurizer(adapter, CFG)
    groups = featurize(adapter, batch, CFG)
    assert list(groups) == list(featurizer.layout.group_names)
    flat = torch.cat([groups[g] for g in featurizer.layout.group_names], dim=1)
    torch.testing.assert_close(flat, featurizer.flat(batch), **TOL)


SCRIPT = """
import json, sys, torch
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.config import FeaturizeConfig, TimestepConfig
from attribution_core.features.featurize import Featurizer
adapter = load_adapter(sys.argv[1])
g = torch.Generator().manual_seed(0)
pixels = torch.rand((3, *adapter.image_shape), generator=g) * 2 - 1
cfg = FeaturizeConfig(timesteps=TimestepConfig(count=3, strategy="random"), noise_draws=2, seed=3)
flat = Featurizer(adapter, cfg).flat(ExampleBatch(("ex0", "ex1", "ex2"), pixels))
print(json.dumps(flat[1].tolist()))
"""


def test_same_features_in_another_process(model_dirs, adapters):
    out = subprocess.run([sys.executable, "-c", SCRIPT, model_dirs["unet"]], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PATH": "", "HF_HUB_OFFLINE": "1"})
    theirs = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    batch = make_batch(adapters["unet"], n=3)
    ours = Featurizer(adapters["unet"], CFG).flat(batch.select(1, 2))[0]
    torch.testing.assert_close(theirs, ours, **TOL)
