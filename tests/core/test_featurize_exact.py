"""The fast Kronecker-factored featurizer equals the explicit projection of exact
per-example gradients (torch.func vmap(grad)), layer by layer."""

from __future__ import annotations

import pytest
import torch

from attribution_core.config import FeaturizeConfig, GroupConfig, TimestepConfig
from attribution_core.features.featurize import Featurizer
from attribution_core.features.reference import reference_features, reference_row_scale
from tests.conftest import KINDS, make_batch

REL_TOL = 1e-4


def assert_exact(fast: torch.Tensor, ref: torch.Tensor, layout) -> None:
    errors = per_layer_rel_errors(fast, ref, layout)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= REL_TOL, f"{worst}: relative error {errors[worst]:.2e}"


def per_layer_rel_errors(fast: torch.Tensor, ref: torch.Tensor, layout) -> dict[str, float]:
    errors = {}
    for layer in layout.layers:
        sl = slice(layer.offset, layer.offset + layer.dim)
        denom = ref[:, sl].norm()
        assert denom > 0, f"reference gradient of {layer.name} is zero: the test would prove nothing"
        errors[layer.name] = float((fast[:, sl] - ref[:, sl]).norm() / denom)
    return errors


@pytest.mark.parametrize("measurement", ["loss", "square", "das"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_equals_reference_for_every_layer(adapters, kind, measurement):
    adapter = adapters[kind]
    cfg = FeaturizeConfig(
        measurement=measurement, timesteps=TimestepConfig(count=3), noise_draws=2,
        groups=GroupConfig(preset="layer"),
    )
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=3)
    fast = featurizer.flat(batch)
    ref = reference_features(adapter, batch, cfg, featurizer.layout)
    assert_exact(fast, ref, featurizer.layout)


@pytest.mark.parametrize("kind", KINDS)
def test_das_row_scale_equals_the_reference(adapters, kind):
    """DAS's training-side scale from the featurizing pass equals the error profile measured
    one row at a time; batch composition does not change it; the query side has none."""
    adapter = adapters[kind]
    cfg = FeaturizeConfig(measurement="das", timesteps=TimestepConfig(count=4), noise_draws=1, seed=3)
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=3)
    flat, scale = featurizer.flat_and_scale(batch)
    ref = reference_row_scale(adapter, batch, cfg)
    assert scale.shape == (3,)
    torch.testing.assert_close(scale.double(), ref, rtol=1e-4, atol=0)
    # scale-free: at most 1/sqrt(rows) (equal errors), and above 0
    assert bool(((scale > 0) & (scale <= 0.5 + 1e-6)).all())
    alone, alone_scale = featurizer.flat_and_scale(batch.select(1, 2))
    torch.testing.assert_close(alone_scale, scale[1:2], rtol=1e-4, atol=0)
    torch.testing.assert_close(alone, flat[1:2], rtol=1e-4, atol=1e-7)
    assert Featurizer(adapter, FeaturizeConfig(measurement="square")).flat_and_scale(batch)[1] is None


def test_reference_covers_the_layer_kinds_the_issue_names(adapters):
    """Conv with stride/padding, self- and cross-attention Linears and time-embedding
    Linears are all tracked (and so all held equal by the test above)."""
    layout = Featurizer(adapters["text"], FeaturizeConfig(groups=GroupConfig(preset="layer"))).layout
    names = {ly.name for ly in layout.layers}
    modules = dict(adapters["text"].denoiser.named_modules())
    strided = [n for n in names if isinstance(modules[n], torch.nn.Conv2d) and modules[n].stride != (1, 1)]
    assert strided, "no strided conv tracked"
    assert any(n.endswith("attn1.to_q") for n in names)
    assert any(n.endswith("attn2.to_k") for n in names)
    assert {"time_embedding.linear_1", "time_embedding.linear_2"} <= names
    unet_names = {ly.name for ly in Featurizer(adapters["unet"], FeaturizeConfig()).layout.layers}
    assert any(".attentions." in n and n.endswith("to_v") for n in unet_names)


def test_random_timesteps_and_v_prediction_match_reference(model_dirs):
    from attribution_core.models.pipeline_dir import load_adapter

    adapter = load_adapter(model_dirs["unet"])
    adapter.scheduler.register_to_config(prediction_type="v_prediction")
    cfg = FeaturizeConfig(measurement="loss", timesteps=TimestepConfig(count=2, strategy="random"), seed=7)
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=2)
    errors = per_layer_rel_errors(featurizer.flat(batch), reference_features(adapter, batch, cfg, featurizer.layout),
                                  featurizer.layout)
    assert max(errors.values()) <= REL_TOL


def test_excluded_upstream_layer_does_not_change_the_others(adapters):
    """Excluding conv_in leaves the next layers' inputs grad-free; their features must not
    change (the leaf-output path must kick in)."""
    adapter = adapters["unet"]
    batch = make_batch(adapter, n=2)
    full = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="layer")))
    part = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="layer", exclude=("conv_in",))))
    f_full, f_part = full.split(full.flat(batch)), part.split(part.flat(batch))
    assert "conv_in" not in f_part
    for name, value in f_part.items():
        torch.testing.assert_close(value, f_full[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["text", "unet-class"])
def test_timestep_normalisation_equals_the_reference(adapters, kind):
    """featurize.normalize 'timestep': each row's projected gradient at unit norm, then the
    rows averaged; exact against per-row vmap gradients normalised the same way."""
    adapter = adapters[kind]
    cfg = FeaturizeConfig(measurement="loss", timesteps=TimestepConfig(count=3), noise_draws=2,
                          groups=GroupConfig(preset="layer"), normalize="timestep")
    featurizer = Featurizer(adapter, cfg)
    batch = make_batch(adapter, n=3)
    fast = featurizer.flat(batch)
    ref = reference_features(adapter, batch, cfg, featurizer.layout)
    assert_exact(fast, ref, featurizer.layout)
    # A mean of 6 unit vectors: norm at most 1, and not the plain feature rescaled.
    assert bool((fast.norm(dim=1) <= 1 + 1e-5).all())
    plain = Featurizer(adapter, FeaturizeConfig(measurement="loss", timesteps=TimestepConfig(count=3), noise_draws=2,
                                                groups=GroupConfig(preset="layer"))).flat(batch)
    cosine = torch.nn.functional.cosine_similarity(fast, plain, dim=1)
    assert bool((cosine < 0.9999).all()), "normalising each row changed nothing"


@pytest.mark.parametrize("kind", ["text", "text-latent"])
def test_contrastive_query_features_equal_the_reference(adapters, kind):
    """Concept-TRAK's query side: gradient of mean(eps_c * sg(eps_c - eps_c-)), exact against
    vmap(grad) of the same measurement, and different from the plain query feature."""
    import dataclasses

    adapter = adapters[kind]
    cfg = FeaturizeConfig(measurement="square", timesteps=TimestepConfig(count=3), noise_draws=1,
                          groups=GroupConfig(preset="layer"))
    featurizer = Featurizer(adapter, cfg)
    plain = make_batch(adapter, n=3)
    batch = dataclasses.replace(plain, captions=("a striped circle", "a dotted ring", "a blue square"),
                                contrast_captions=("a striped shape", "a ring", "a square"))
    fast = featurizer.flat(batch)
    ref = reference_features(adapter, batch, cfg, featurizer.layout)
    assert_exact(fast, ref, featurizer.layout)
    same = featurizer.flat(dataclasses.replace(batch, contrast_captions=None))
    assert not torch.allclose(fast, same)
    # Removing nothing leaves nothing to contrast: the feature is zero.
    none = featurizer.flat(dataclasses.replace(batch, contrast_captions=batch.captions))
    assert float(none.abs().max()) == 0.0


def test_a_pooled_text_embedding_in_the_time_embedding_is_featurized_exactly():
    """train.text_in_time adds diffusers' text time-embedding (an attention pooling of the
    prompt): its Linears see only text states and must still get their gradients."""
    from diffusers import DDPMScheduler

    from attribution_core.models.adapters import DiffusersAdapter
    from attribution_core.models.tiny import text_encoder_for, unet_cond, word_tokenizer

    torch.manual_seed(0)
    tokenizer = word_tokenizer(["a", "striped", "circle", "dotted", "ring", "blue", "square", "red", "star", "cross"])
    adapter = DiffusersAdapter(unet_cond(8, 3, 16, (8, 16), layers_per_block=1, text_in_time=True), DDPMScheduler(),
                               text_encoder=text_encoder_for(tokenizer, 16, 1), tokenizer=tokenizer)
    cfg = FeaturizeConfig(measurement="loss", timesteps=TimestepConfig(count=2), groups=GroupConfig(preset="layer"))
    featurizer = Featurizer(adapter, cfg)
    assert any(ly.name.startswith("add_embedding.pool") for ly in featurizer.layout.layers)
    batch = make_batch(adapter, n=2)
    assert_exact(featurizer.flat(batch), reference_features(adapter, batch, cfg, featurizer.layout), featurizer.layout)
