"""GPU tier (marker ``gpu``; skipped without CUDA): the same exactness on the device, and
bf16 autocast close to fp32."""

from __future__ import annotations

import pytest
import torch

from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.config import FeaturizeConfig, TimestepConfig
from attribution_core.features.featurize import Featurizer
from attribution_core.features.reference import reference_features
from tests.conftest import make_batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dirs", ["model_dirs", "lora_dirs"])  # a full model, and LoRA adapters on it
@pytest.mark.parametrize("kind", ["unet-class", "text-latent"])
def test_cuda_fast_equals_reference(request, dirs, kind):
    adapter = load_adapter(request.getfixturevalue(dirs)[kind], device="cuda")
    cfg = FeaturizeConfig(timesteps=TimestepConfig(count=2))
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=2)
    fast = featurizer.flat(batch)
    ref = reference_features(adapter, batch, cfg, featurizer.layout)
    assert float((fast - ref).norm() / ref.norm()) < 1e-4


def test_bf16_autocast_close_to_fp32(model_dirs):
    adapter = load_adapter(model_dirs["text"], device="cuda")
    batch = make_batch(adapter, n=2)
    fp32 = Featurizer(adapter, FeaturizeConfig()).flat(batch)
    bf16 = Featurizer(adapter, FeaturizeConfig(precision="bfloat16")).flat(batch)
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert bool((cos > 0.98).all()), cos
