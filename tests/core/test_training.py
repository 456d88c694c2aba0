"""Training recipe, save/load and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.config import FeaturizeConfig, TrainConfig
from attribution_core.data.loading import load_training_data
from attribution_core.data.writers import write_synthetic
from attribution_core.errors import InputError
from attribution_core.features.featurize import Featurizer
from attribution_core.models.adapters import ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.sampling import generate
from attribution_core.models.training import train_model
from attribution_core.models.training_dir import save_model

TINY = dict(resolution=8, widths=(8, 16), text_width=16, batch_size=16, warmup_steps=2, max_caption_tokens=12)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("synth") / "data")
    write_synthetic(uri, 64, seed=0, size=16)
    return uri


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    cfg = TrainConfig(**TINY, steps=40, learning_rate=3e-3)
    data = load_training_data(synth, cfg)
    model = train_model(data, cfg)
    path = save_model(model, tmp_path_factory.mktemp("m") / "model", {"data": synth})
    return model, path, data


def test_a_few_steps_lower_the_loss(trained):
    losses = trained[0].losses
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses


def test_training_is_deterministic_for_a_seed(synth):
    cfg = TrainConfig(**TINY, steps=3)
    data = load_training_data(synth, cfg)
    a, b = train_model(data, cfg), train_model(data, cfg)
    c = train_model(data, TrainConfig(**TINY, steps=3, seed=1))
    sa, sb, sc = (m.adapter.denoiser.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.losses == b.losses


def test_save_load_round_trip_gives_identical_outputs(trained):
    model, path, data = trained
    loaded = load_adapter(path)
    assert loaded.conditioning == "text"
    batch = ExampleBatch(tuple(data.example_ids[:3]), data.pixels[:3], tuple(data.captions[:3]))
    cfg = FeaturizeConfig()
    torch.testing.assert_close(Featurizer(loaded, cfg).flat(batch), Featurizer(model.adapter, cfg).flat(batch),
                               rtol=0, atol=0)
    ids = loaded.tokenizer(list(batch.captions), padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    ids0 = model.adapter.tokenizer(list(batch.captions), padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ids0)
    words = set(" ".join(data.captions).split())
    assert all(len(loaded.tokenizer.tokenize(w)) == 1 for w in words), "caption words are single tokens"


def test_sampling_is_reproducible_by_seed(trained):
    adapter = load_adapter(trained[1])
    prompts = ["a filled circle on a grid background", "an outlined square on a solid background"]
    a = generate(adapter, prompts=prompts, n=3, seed=4, steps=4)
    b = generate(adapter, prompts=prompts, n=3, seed=4, steps=4)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert a[0].image.shape == (8, 8, 3) and a[0].image.dtype == np.uint8
    # Image 2 alone (a different batch) is the same image.
    (alone,) = generate(adapter, prompts=[prompts[0]], n=1, seed=4, steps=4, first_index=2)
    assert np.array_equal(alone.image, a[2].image)
    c = generate(adapter, prompts=prompts, n=3, seed=5, steps=4)
    assert not np.array_equal(a[0].image, c[0].image)
    d1 = generate(adapter, prompts=prompts, n=2, seed=4, steps=4, scheduler="ddpm")
    d2 = generate(adapter, prompts=prompts, n=2, seed=4, steps=4, scheduler="ddpm")
    assert all(np.array_equal(x.image, y.image) for x, y in zip(d1, d2))


def test_unconditional_and_class_recipes(synth):
    for cond, extra in (("none", {}), ("class", {"label_column": "subject"})):
        cfg = TrainConfig(**TINY, steps=2, conditioning=cond, **extra)
        data = load_training_data(synth, cfg)
        model = train_model(data, cfg)
        assert model.adapter.conditioning == cond
        if cond == "class":
            assert data.label_names and len(data.label_names) == int(data.labels.max()) + 1
            images = generate(model.adapter, labels=[0, 1], n=2, steps=2)
        else:
            images = generate(model.adapter, n=2, steps=2)
        assert len(images) == 2


def test_grayscale_any_size_dataset(tmp_path):
    from tests.core.test_data import _image_folder

    root = _image_folder(tmp_path / "f", n=6, mode="L", size=(20, 20))
    cfg = TrainConfig(**{**TINY, "channels": 1}, steps=2, conditioning="text")
    data = load_training_data(str(root), cfg)
    assert data.pixels.shape == (6, 1, 8, 8)
    assert train_model(data, cfg).adapter.image_shape == (1, 8, 8)


def test_text_recipe_needs_captions(tmp_path):
    from attribution_core.data.loading import TrainingData

    with pytest.raises(InputError, match="no caption column"):
        train_model(TrainingData(["a"], torch.zeros(1, 3, 8, 8)), TrainConfig(**TINY, steps=1))


@pytest.mark.slow  # three trainings
def test_checkpoints_are_the_ema_weights_along_the_way_and_change_nothing(synth, tmp_path):
    """train_to_dir(checkpoints=3) keeps the model at steps 2 and 4 of 6 beside the final one
    (each with its learning rate, for TracIn-CP), and the final model is bit-identical to a run
    that kept none; what is saved is what the loop hands the callback (its EMA weights)."""
    from attribution_core.models.checkpoints import model_checkpoints
    from attribution_core.models.training import checkpoint_steps, learning_rate_at
    from attribution_core.models.training_dir import train_to_dir

    assert checkpoint_steps(6, 3) == [2, 4, 6] and checkpoint_steps(5, 1) == [5] and checkpoint_steps(2, 4) == [1, 2]
    cfg = TrainConfig(**TINY, steps=6)
    train_to_dir(synth, cfg, tmp_path / "kept", checkpoints=3)
    train_to_dir(synth, cfg, tmp_path / "plain")
    found = model_checkpoints(tmp_path / "kept")
    assert [(s, p.name) for s, _, p in found] == [(2, "step-0000002"), (4, "step-0000004"), (6, "kept")]
    assert [lr for _, lr, _ in found] == pytest.approx([learning_rate_at(cfg, s) for s in (2, 4, 6)])
    assert [s for s, _, _ in model_checkpoints(tmp_path / "plain")] == [6]
    states = [load_adapter(p).denoiser.state_dict() for _, _, p in found]
    plain = load_adapter(tmp_path / "plain").denoiser.state_dict()
    assert all(torch.equal(states[2][k], plain[k]) for k in plain)
    assert not all(torch.equal(states[1][k], plain[k]) for k in plain)
    captured: dict[int, dict[str, torch.Tensor]] = {}

    def capture(step: int, model) -> None:
        captured[step] = {k: v.clone() for k, v in model.adapter.denoiser.state_dict().items()}

    again = train_model(load_training_data(synth, cfg), cfg, checkpoint=capture, checkpoints=3)
    assert set(captured) == {2, 4} and all(torch.equal(captured[4][k], states[1][k]) for k in plain)
    assert all(torch.equal(again.adapter.denoiser.state_dict()[k], plain[k]) for k in plain)


def test_training_in_the_callers_process_keeps_its_thread_count(synth):
    """recipe.threads pins torch's threads while training (one model per CPU in the
    evaluation's Ray tasks); a caller training in its own process gets its threads back."""
    before = torch.get_num_threads()
    cfg = TrainConfig(**TINY, steps=1, threads=1 if before > 1 else 2)
    train_model(load_training_data(synth, cfg), cfg)
    assert torch.get_num_threads() == before
