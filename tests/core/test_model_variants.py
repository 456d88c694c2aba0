"""Weights stored as users keep them: an fp16 / bf16 variant (``*.fp16.safetensors``) loads,
upcast to float32, featurizes exactly in float32, and has its own fingerprint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attribution_core.config import FeaturizeConfig, GroupConfig, TimestepConfig
from attribution_core.errors import ModelLoadError
from attribution_core.features.featurize import Featurizer
from attribution_core.features.reference import reference_features
from attribution_core.models.pipeline_dir import load_adapter, stored_variant
from attribution_core.models.fingerprint import model_fingerprint
from tests.conftest import make_batch
from tests.core.test_featurize_exact import assert_exact


def half_copy(src: str, out: Path, variant: str, dtype: torch.dtype) -> Path:
    """``src`` with every weight folder re-saved as the ``variant`` in ``dtype`` only."""
    shutil.copytree(src, out)
    adapter = load_adapter(src)
    for name in ("unet", "text_encoder", "vae"):
        module = {"unet": adapter.denoiser}.get(name, getattr(adapter, name, None))
        if module is None:
            continue
        shutil.rmtree(out / name)
        module.to(dtype).save_pretrained(out / name, variant=variant)
    return out


@pytest.mark.parametrize("variant,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_variant_loads_as_float32_and_featurizes_exactly(model_dirs, tmp_path, variant, dtype):
    original = load_adapter(model_dirs["text-latent"])
    half = half_copy(model_dirs["text-latent"], tmp_path / variant, variant, dtype)
    assert stored_variant(half / "unet") == variant and stored_variant(half / "text_encoder") == variant
    adapter = load_adapter(half)
    for module in (adapter.denoiser, adapter.text_encoder, adapter.vae):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert adapter.variants == {"unet": variant, "text_encoder": variant, "vae": variant}
    # The weights are the original's rounded to the variant's precision.
    for (name, p), q in zip(adapter.denoiser.named_parameters(), original.denoiser.parameters()):
        torch.testing.assert_close(p, q.to(dtype).float(), rtol=0, atol=0, msg=name)
    cfg = FeaturizeConfig(measurement="square", timesteps=TimestepConfig(count=2), groups=GroupConfig(preset="block"))
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=2)
    fast = featurizer.flat(batch)
    assert fast.dtype == torch.float32
    assert_exact(fast, reference_features(adapter, batch, cfg, featurizer.layout), featurizer.layout)
    # Close to the original's features, and still another model.
    reference = Featurizer(original, cfg).flat(batch)
    assert float((fast - reference).norm() / reference.norm()) < 0.05
    assert model_fingerprint(adapter) != model_fingerprint(original)
    assert model_fingerprint(adapter) == model_fingerprint(load_adapter(half))


def test_a_folder_of_two_variants_without_the_plain_file_is_refused(model_dirs, tmp_path):
    half = half_copy(model_dirs["unet"], tmp_path / "m", "fp16", torch.float16)
    shutil.copy(half / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                half / "unet" / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(ModelLoadError, match="several variants"):
        load_adapter(half)
