"""Customization for the exemplar check: a LoRA fine-tune folded into the weights it adapts,
so the customized model has the indexed model's modules and parameter groups, a LoRA model
keeps its own adapters, and the original model is left as it was."""

from __future__ import annotations

import pytest
import torch

from attribution_core.config import FeaturizeConfig
from attribution_core.errors import ConfigError, InputError
from attribution_core.features.groups import build_layout
from attribution_core.models.customize import Customization, customize, fold_adapters
from attribution_core.models.lora import has_lora
from attribution_core.models.pipeline_dir import load_adapter
from tests.conftest import make_batch

RECIPE = Customization(rank=2, steps=6, batch_size=4, learning_rate=0.01, seed=3)


def _inputs(adapter, n: int = 4) -> dict:
    batch = make_batch(adapter, n=n, seed=1)
    return {"captions": ["a sks"] * n if adapter.conditioning == "text" else None, "labels": batch.labels,
            "pixels": batch.pixels}


@pytest.mark.parametrize("kind", ["text", "unet-class", "text-latent"])
def test_customization_changes_only_the_targets_and_keeps_the_layout(adapters, kind):
    adapter = adapters[kind]
    before = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    inputs = _inputs(adapter)
    custom = customize(adapter, inputs.pop("pixels"), RECIPE, words=["a sks"], **inputs)
    assert adapter.denoiser.state_dict().keys() == custom.denoiser.state_dict().keys()
    assert all(torch.equal(v, adapter.denoiser.state_dict()[k]) for k, v in before.items())  # the original is kept
    moved = {k for k, v in custom.denoiser.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") for k in moved), moved
    groups = FeaturizeConfig().groups
    projection = FeaturizeConfig().projection
    assert build_layout(custom.denoiser, groups, projection) == build_layout(adapter.denoiser, groups, projection)
    if kind != "unet-class":
        assert custom.text_encoder is adapter.text_encoder
        assert adapter.vocabulary is None or "sks" in custom.vocabulary
    # Deterministic: the same set and recipe give the same weights.
    again = customize(adapter, _inputs(adapter)["pixels"], RECIPE, words=["a sks"],
                      **{k: v for k, v in _inputs(adapter).items() if k != "pixels"})
    assert all(torch.equal(v, again.denoiser.state_dict()[k]) for k, v in custom.denoiser.state_dict().items())


def test_a_lora_model_keeps_its_adapters_and_the_update_goes_beneath_them(lora_dirs):
    adapter = load_adapter(lora_dirs["text"])
    assert has_lora(adapter.denoiser)
    inputs = _inputs(adapter)
    custom = customize(adapter, inputs.pop("pixels"), RECIPE, **inputs)
    state, custom_state = adapter.denoiser.state_dict(), custom.denoiser.state_dict()
    assert state.keys() == custom_state.keys()
    assert all(torch.equal(custom_state[k], state[k]) for k in state if ".lora_" in k)  # the user's adapters as they were
    assert any(not torch.equal(custom_state[k], state[k]) for k in state if k.endswith("base_layer.weight"))
    # Folding the user's adapters gives the model the customization was trained on.
    plain = fold_adapters(custom.denoiser)
    assert not has_lora(plain)


def test_bad_customization_inputs_are_refused(adapters):
    adapter = adapters["text"]
    with pytest.raises(InputError, match="one caption per exemplar"):
        customize(adapter, _inputs(adapter)["pixels"], RECIPE, captions=["a sks"])
    with pytest.raises(InputError, match="at least one image"):
        customize(adapter, torch.zeros((0, *adapter.image_shape)), RECIPE, captions=[])
    with pytest.raises(ConfigError, match="evaluate.exemplars.targets"):
        customize(adapter, _inputs(adapter)["pixels"], Customization(targets=("nothing_like_this",)),
                  captions=["a sks"] * 4)


def test_a_class_model_learns_the_set_as_a_new_class_without_touching_the_others(adapters):
    adapter = adapters["unet-class"]
    inputs = _inputs(adapter)
    custom = customize(adapter, inputs["pixels"], RECIPE, labels=inputs["labels"], new_class="sks")
    classes = adapter.num_classes
    assert custom.num_classes == classes + 1 and custom.label_names[-1] == "sks"
    old, new = adapter.denoiser.class_embedding.weight, custom.denoiser.class_embedding.weight
    assert torch.equal(new[:classes], old)  # the classes the index was built with are as they were
    start = old[inputs["labels"]].mean(0)
    assert not torch.allclose(new[classes], start)  # the new row was trained from the mean of the exemplars' classes
    groups, projection = FeaturizeConfig().groups, FeaturizeConfig().projection
    assert build_layout(custom.denoiser, groups, projection) == build_layout(adapter.denoiser, groups, projection)
    with pytest.raises(InputError, match="class-conditional models only"):
        customize(adapters["text"], _inputs(adapters["text"])["pixels"], RECIPE, captions=["a sks"] * 4, new_class="x")
