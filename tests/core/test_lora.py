"""LoRA fine-tunes: the featurizer tracks the adapters exactly, the saved file is diffusers'
own, the fingerprint tells base from fine-tune, and bad LoRA directories are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from attribution_core.config import FeaturizeConfig, GroupConfig, TimestepConfig, TrainConfig
from attribution_core.errors import ConfigError, ModelLoadError
from attribution_core.features.featurize import Featurizer
from attribution_core.features.reference import reference_features
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.lora import LoraSpec, add_lora, is_adapter_layer, target_name
from attribution_core.data.loading import TrainingData
from attribution_core.models.training import train_model
from tests.conftest import KINDS, make_batch, write_diffusers_lora, write_lora
from tests.core.test_featurize_exact import assert_exact


@pytest.fixture(scope="module")
def lora_adapters(lora_dirs):
    return {kind: load_adapter(path) for kind, path in lora_dirs.items()}


@pytest.mark.parametrize("measurement", ["loss", "square"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_features_equal_the_reference_restricted_to_lora_parameters(lora_adapters, kind, measurement):
    adapter = lora_adapters[kind]
    cfg = FeaturizeConfig(measurement=measurement, timesteps=TimestepConfig(count=3), noise_draws=2,
                          groups=GroupConfig(preset="layer"))
    featurizer = Featurizer(adapter, cfg)
    names = [layer.name for layer in featurizer.layout.layers]
    lora_params = {n for n, _ in adapter.denoiser.named_parameters() if ".lora_" in n}
    assert {f"{n}.weight" for n in names} == lora_params  # every adapter weight, nothing of the base
    batch = make_batch(adapter, n=3)
    assert_exact(featurizer.flat(batch), reference_features(adapter, batch, cfg, featurizer.layout), featurizer.layout)


def test_groups_follow_the_adapted_module_and_can_include_the_base(lora_adapters):
    adapter = lora_adapters["text"]
    layout = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="function"))).layout
    assert set(layout.group_names) == {"self_attn_qkv", "self_attn_out", "cross_attn_q", "cross_attn_k",
                                       "cross_attn_v", "cross_attn_out"}
    for layer in layout.layers:
        assert is_adapter_layer(layer.name)
        kind = {"to_q": "q", "to_k": "k", "to_v": "v"}.get(target_name(layer.name).rsplit(".", 1)[-1], "out")
        assert layer.group.endswith(kind) or (kind in "qkv" and layer.group == "self_attn_qkv")
    by_block = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="block"))).layout
    assert set(by_block.group_names) <= {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    # A pattern over the adapted module's name selects its adapters.
    only_k = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="layer", include=("*attn2.to_k",)))).layout
    assert only_k.layers and all(target_name(ly.name).endswith("attn2.to_k") for ly in only_k.layers)
    everything = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="block", lora_only=False))).layout
    names = {ly.name for ly in everything.layers}
    assert any(n.endswith("to_q.base_layer") for n in names) and "conv_in" in names
    assert {ly.name for ly in layout.layers} < names


def test_saved_file_is_diffusers_lora_and_loads_the_same(lora_dirs, lora_adapters, model_dirs):
    """diffusers' own loader on the base gives the same denoiser output as ours."""
    from diffusers import UNet2DConditionModel

    adapter = lora_adapters["text"]
    unet = UNet2DConditionModel.from_pretrained(f"{model_dirs['text']}/unet")
    unet.load_lora_adapter(f"{lora_dirs['text']}/pytorch_lora_weights.safetensors", prefix="unet")
    base = load_adapter(model_dirs["text"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *adapter.image_shape, generator=g)
    t = torch.tensor([10, 500])
    states = adapter.encode_text(["a red star", "a cross"])
    with torch.no_grad():
        ours = adapter.denoise(x, t, {"encoder_hidden_states": states})
        theirs = unet(x, t, encoder_hidden_states=states, return_dict=False)[0]
        plain = base.denoise(x, t, {"encoder_hidden_states": states})
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours - plain).abs().max() > 1e-3  # the adapters change the output


def test_fingerprint_covers_base_and_adapters(lora_dirs, model_dirs, tmp_path):
    lora = model_fingerprint(load_adapter(lora_dirs["unet"]))
    assert lora != model_fingerprint(load_adapter(model_dirs["unet"]))
    # The same fine-tune elsewhere (its base with it) has the same fingerprint ...
    shutil.copytree(model_dirs["unet"], tmp_path / "base")
    moved = write_lora(str(tmp_path / "base"), tmp_path / "moved", seed=0)
    assert model_fingerprint(load_adapter(moved)) == lora
    # ... other adapter weights or another alpha do not.
    assert model_fingerprint(load_adapter(write_lora(str(tmp_path / "base"), tmp_path / "other", seed=5))) != lora
    record = json.loads((tmp_path / "moved" / "lora.json").read_text())
    (tmp_path / "moved" / "lora.json").write_text(json.dumps({**record, "alpha": 4.0}))
    assert model_fingerprint(load_adapter(moved)) != lora


def test_bad_lora_directories_say_what_to_fix(lora_dirs, model_dirs, tmp_path):
    bad = tmp_path / "no-pointer"
    bad.mkdir()
    shutil.copy(f"{lora_dirs['unet']}/pytorch_lora_weights.safetensors", bad)
    with pytest.raises(ModelLoadError, match="name the base pipeline directory .* with model.base"):
        load_adapter(bad)
    assert load_adapter(bad, base=model_dirs["unet"]).lora.rank == 2  # the base named by the caller
    with pytest.raises(ModelLoadError, match=r"does not exist; fix model.base \(--base\)"):
        load_adapter(bad, base=tmp_path / "nowhere")
    moved = tmp_path / "a" / "b" / "c" / "elsewhere"  # the relative pointer leads nowhere from here
    shutil.copytree(lora_dirs["unet"], moved)
    with pytest.raises(ModelLoadError, match="does not exist; fix \"base\""):
        load_adapter(moved)
    wrong_base = tmp_path / "wrong-base"
    shutil.copytree(lora_dirs["unet"], wrong_base)
    record = json.loads((wrong_base / "lora.json").read_text())
    (wrong_base / "lora.json").write_text(json.dumps({**record, "base": model_dirs["text"]}))
    with pytest.raises(ModelLoadError, match="not the one the LoRA"):
        load_adapter(wrong_base)
    from safetensors.torch import load_file, save_file

    with_text = tmp_path / "with-text"  # text-encoder adapters on a base without a text encoder
    shutil.copytree(lora_dirs["unet"], with_text)
    weights = load_file(with_text / "pytorch_lora_weights.safetensors")
    save_file({**weights, "text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)},
              with_text / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="adapts a text encoder but the base model has none"):
        load_adapter(with_text)
    save_file({**weights, "text_encoder_2.layers.0.q_proj.lora_A.weight": torch.zeros(2, 4)},
              with_text / "pytorch_lora_weights.safetensors")
    with pytest.raises(ModelLoadError, match="weights under text_encoder_2"):
        load_adapter(with_text)
    unet = load_adapter(model_dirs["unet"]).denoiser
    with pytest.raises(ConfigError, match=r"LoRA targets \['to_kv'\] match no"):
        add_lora(unet, LoraSpec(rank=2, alpha=2.0, targets=("to_q", "to_kv")))
    with pytest.raises(ConfigError, match="needs both base"):
        TrainConfig(lora_rank=4)


def _data(adapter, n: int = 16) -> TrainingData:
    batch = make_batch(adapter, n=n, seed=3)
    return TrainingData(example_ids=list(batch.example_ids), pixels=batch.pixels,
                        captions=list(batch.captions) if batch.captions else None,
                        labels=batch.labels, label_names=["0", "1", "2"] if batch.labels is not None else None)


@pytest.mark.parametrize("kind", ["unet-class", "text-latent"])
def test_lora_training_moves_only_the_adapters(model_dirs, kind):
    base = load_adapter(model_dirs[kind])
    conditioning = {"unet-class": "class", "text-latent": "text"}[kind]
    cfg = TrainConfig(resolution=base.image_shape[1], conditioning=conditioning, steps=12, batch_size=4,
                      warmup_steps=1, learning_rate=0.01, ema_decay=0.5, base=model_dirs[kind], lora_rank=2)
    model = train_model(_data(base, 16), cfg)
    tuned = model.adapter
    assert model.base_fingerprint == model_fingerprint(base) and tuned.lora.rank == 2
    assert model.trainable_parameters == sum(p.numel() for n, p in tuned.denoiser.named_parameters() if ".lora_" in n)
    base_state = base.denoiser.state_dict()
    for name, value in tuned.denoiser.state_dict().items():
        if ".lora_B." in name:
            assert value.abs().max() > 0, f"{name} did not move from its zero start"
        elif ".lora_" not in name:
            torch.testing.assert_close(value, base_state[name.replace(".base_layer", "")], rtol=0, atol=0)
    data = _data(base, 4)
    data.pixels = torch.nn.functional.interpolate(data.pixels, scale_factor=2)  # read at another resolution
    with pytest.raises(ConfigError, match="set resolution"):
        train_model(data, TrainConfig(resolution=base.image_shape[1] * 2, conditioning=conditioning, steps=1,
                                      base=model_dirs[kind], lora_rank=2))


@pytest.fixture(scope="module")
def diffusers_lora(model_dirs, tmp_path_factory):
    """UNet and text-encoder adapters saved as diffusers' DreamBooth LoRA script saves them."""
    return write_diffusers_lora(model_dirs["text"], tmp_path_factory.mktemp("diffusers-lora") / "lora")


def test_a_diffusers_lora_folder_loads_on_the_named_base_as_diffusers_loads_it(diffusers_lora, model_dirs):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    base = model_dirs["text"]
    assert sorted(p.name for p in Path(diffusers_lora).iterdir()) == ["pytorch_lora_weights.safetensors"]
    ours = load_adapter(diffusers_lora, base=base)
    assert ours.lora.rank == 2 and ours.lora.alpha == 2.0 and ours.lora.text_encoder.rank == 2
    state, alphas = StableDiffusionPipeline.lora_state_dict(diffusers_lora)[:2]
    text_encoder = CLIPTextModel.from_pretrained(f"{base}/text_encoder")
    StableDiffusionPipeline.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=text_encoder,
                                                        prefix="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(f"{base}/unet")
    unet.load_lora_adapter(f"{diffusers_lora}/pytorch_lora_weights.safetensors", prefix="unet")
    ids = ours.tokenize(["a red star", "a cross"])
    x, t = torch.randn(2, *ours.image_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        states = ours.text_states(ids)
        torch.testing.assert_close(states, text_encoder(ids)[0], rtol=0, atol=0)
        torch.testing.assert_close(ours.denoise(x, t, {"encoder_hidden_states": states}),
                                   unet(x, t, encoder_hidden_states=states, return_dict=False)[0], rtol=0, atol=0)
        assert (load_adapter(base).text_states(ids) - states).abs().max() > 1e-3  # the text adapters act
    # The fingerprint covers the text encoder's adapters: other text weights, another model.
    other = load_adapter(diffusers_lora, base=base)
    with torch.no_grad():
        next(p for n, p in other.text_encoder.named_parameters() if ".lora_B." in n).add_(0.01)
    assert model_fingerprint(other) != model_fingerprint(ours)
    assert model_fingerprint(load_adapter(diffusers_lora, base=base)) == model_fingerprint(ours)


@pytest.mark.parametrize("normalize", ["none", "timestep"])
def test_text_encoder_adapters_are_featurized_exactly_in_their_own_group(diffusers_lora, model_dirs, normalize):
    adapter = load_adapter(diffusers_lora, base=model_dirs["text"])
    cfg = FeaturizeConfig(timesteps=TimestepConfig(count=3), noise_draws=1, normalize=normalize,
                          groups=GroupConfig(preset="function"))
    featurizer = Featurizer(adapter, cfg)
    text = featurizer.layout.group("text_encoder")
    lora_params = {f"text_encoder.{n}" for n, _ in adapter.text_encoder.named_parameters() if ".lora_" in n}
    assert {f"{n}.weight" for n in text.layers} == lora_params
    assert featurizer.layout.group_names[-1] == "text_encoder" and "cross_attn_k" in featurizer.layout.group_names
    batch = make_batch(adapter, n=3)
    assert_exact(featurizer.flat(batch), reference_features(adapter, batch, cfg, featurizer.layout), featurizer.layout)
    # Selected or left out like any other layer.
    unet_only = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="block", exclude=("text_encoder.*",))))
    assert "text_encoder" not in unet_only.layout.group_names and not unet_only.text_tracked
    by_block = Featurizer(adapter, FeaturizeConfig(groups=GroupConfig(preset="block"))).layout
    assert "text_encoder" in by_block.group_names
