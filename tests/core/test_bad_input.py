"""Bad input raises a named error that says what is wrong; never a silent wrong feature."""

from __future__ import annotations

import pytest
import torch

from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.config import FeaturizeConfig, GroupConfig, TimestepConfig, from_mapping
from attribution_core.errors import ConfigError, InputError, ModelLoadError
from attribution_core.features.featurize import Featurizer
from attribution_core.features.measurement import get_measurement
from tests.conftest import make_batch


def test_wrong_image_size(adapters):
    adapter = adapters["text"]
    batch = make_batch(adapter, n=2)
    big = ExampleBatch(batch.example_ids, torch.zeros(2, 3, 32, 32), batch.captions)
    with pytest.raises(InputError, match=r"\(3, 32, 32\).*expects \(3, 16, 16\).*resize to 16x16"):
        Featurizer(adapter, FeaturizeConfig()).flat(big)


def test_wrong_channel_count(adapters):
    adapter = adapters["unet"]
    batch = ExampleBatch(("a",), torch.zeros(1, 1, 16, 16))
    with pytest.raises(InputError, match="3 channel"):
        Featurizer(adapter, FeaturizeConfig()).flat(batch)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_name_the_example(adapters, value):
    adapter = adapters["unet"]
    batch = make_batch(adapter, n=3)
    batch.pixels[1, 0, 0, 0] = value
    with pytest.raises(InputError, match=r"NaN or Inf.*\['ex1'\]"):
        Featurizer(adapter, FeaturizeConfig()).flat(batch)


def test_missing_caption_for_text_model(adapters):
    adapter = adapters["text"]
    batch = make_batch(adapter, n=2)
    with pytest.raises(InputError, match=r"missing caption for examples \['ex1'\]"):
        Featurizer(adapter, FeaturizeConfig()).flat(ExampleBatch(batch.example_ids, batch.pixels, ("a star", None)))
    with pytest.raises(InputError, match="no captions"):
        Featurizer(adapter, FeaturizeConfig()).flat(ExampleBatch(batch.example_ids, batch.pixels))


def test_class_model_labels(adapters):
    adapter = adapters["unet-class"]
    batch = make_batch(adapter, n=2)
    with pytest.raises(InputError, match="no labels"):
        Featurizer(adapter, FeaturizeConfig()).flat(ExampleBatch(batch.example_ids, batch.pixels))
    with pytest.raises(InputError, match=r"outside \[0, 4\).*\['ex1'\]"):
        Featurizer(adapter, FeaturizeConfig()).flat(ExampleBatch(batch.example_ids, batch.pixels, labels=torch.tensor([0, 9])))


def test_unknown_measurement():
    with pytest.raises(ConfigError, match="unknown measurement 'grad'.*loss, square"):
        FeaturizeConfig(measurement="grad")
    with pytest.raises(ConfigError, match="unknown measurement"):
        get_measurement("grad")


def test_unknown_group_pattern(adapters):
    with pytest.raises(ConfigError, match=r"groups.include: pattern 'down_block.\*.nope' matches no"):
        Featurizer(adapters["text"], FeaturizeConfig(groups=GroupConfig(include=("down_block.*.nope",))))
    with pytest.raises(ConfigError, match="groups.custom.attn"):
        Featurizer(adapters["text"], FeaturizeConfig(groups=GroupConfig(preset="custom", custom=(("attn", ("*attn9*",)),))))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown setting.*featurize.nosie_draws"):
        from_mapping(FeaturizeConfig, {"nosie_draws": 2}, "featurize")
    with pytest.raises(ConfigError, match="featurize.timesteps.count: expected an integer"):
        from_mapping(FeaturizeConfig, {"timesteps": {"count": "ten"}}, "featurize")
    with pytest.raises(ConfigError, match="featurize.timesteps.values"):
        TimestepConfig(count=2, strategy="fixed", values=(1,))
    with pytest.raises(ConfigError, match="featurize.noise_draws: must be >= 1"):
        FeaturizeConfig(noise_draws=0)
    from attribution_core.config import EvaluateConfig, WeightsConfig

    with pytest.raises(ConfigError, match=r"weights.holdout_queries: must be >= 0 \(0: no shrinkage"):
        WeightsConfig(holdout_queries=-1)
    with pytest.raises(ConfigError, match=r"weights.validation_queries: must be >= 0 \(0: no validation\)"):
        WeightsConfig(validation_queries=-2)
    with pytest.raises(ConfigError, match=r"evaluate.damping_grid: dampings must be > 0, got \[0.1, 0.0\]"):
        EvaluateConfig(damping_grid=(0.1, 0.0))


def test_fixed_timesteps_beyond_schedule(adapters):
    cfg = FeaturizeConfig(timesteps=TimestepConfig(count=1, strategy="fixed", values=(5000,)))
    with pytest.raises(ConfigError, match="outside the scheduler"):
        Featurizer(adapters["unet"], cfg).flat(make_batch(adapters["unet"], n=1))


def test_model_directory_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no unet/config.json"):
        load_adapter(tmp_path)
