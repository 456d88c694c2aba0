"""Customization: a short LoRA fine-tune of a model on a few exemplars, folded into its weights.

The exemplar check (``evaluate.exemplars``) teaches the attributed model a small set of
images under a prompt of their own; what the customized model then draws from that prompt
was caused by those images. The fine-tune trains fresh LoRA adapters (peft, as the LoRA
recipes do) and then adds their update ``(alpha / rank) B A`` to the weights they adapt, so
the customized model has exactly the modules of the model that was indexed: the index's
parameter groups, projections, kernel and learned weights apply to its features unchanged.
A model that is itself a LoRA fine-tune keeps its adapters; the customization's update is
added to the frozen weights beneath them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from attribution_core.config import TrainConfig
from attribution_core.errors import ConfigError, InputError
from attribution_core.seeding import stable_seed
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.lora import LoraSpec, add_lora
from attribution_core.data.loading import TrainingData
from attribution_core.models.training import train_model
from attribution_core.models.vocabulary import prompt_words


@dataclasses.dataclass(frozen=True)
class Customization:
    """The fine-tune of one exemplar set: LoRA rank and targets, and the optimisation."""

    rank: int = 4
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 2e-3
    seed: int = 0


def fold_adapters(module: nn.Module) -> nn.Module:
    """Merge every peft LoRA layer of ``module`` into the layer it wraps and put that layer
    back in its place (in place; returns ``module``)."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return module


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight a module computes with underneath any LoRA wrapper."""
    from peft.tuners.lora import LoraLayer

    return (module.get_base_layer() if isinstance(module, LoraLayer) else module).weight


def _recipe(adapter: DiffusersAdapter, recipe: Customization) -> TrainConfig:
    prediction = adapter.scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"the exemplar check fine-tunes epsilon or v-prediction models; this one predicts "
                          f"{prediction!r}: leave evaluate.exemplars unset for it")
    c, h, _ = adapter.image_shape
    return TrainConfig(resolution=h, channels=c, widths=(4,), conditioning=adapter.conditioning,
                       steps=recipe.steps, batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
                       warmup_steps=min(10, recipe.steps // 10), ema_decay=0.0, caption_dropout=0.1,
                       prediction_type=prediction,
                       num_train_timesteps=int(adapter.scheduler.config.num_train_timesteps), seed=recipe.seed)


class _WithNewClass(nn.Module):
    """A class-embedding table with one trainable row appended (the rows before it frozen)."""

    def __init__(self, table: nn.Embedding, init: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.extra = nn.Parameter(init.detach().clone()[None])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, torch.cat([self.table.weight, self.extra]))


def customize(adapter: DiffusersAdapter, pixels: torch.Tensor, recipe: Customization, *,
              captions: list[str] | None = None, labels: torch.Tensor | None = None,
              words: Iterable[str] = (), new_class: str | None = None) -> DiffusersAdapter:
    """``adapter``'s model fine-tuned on ``pixels [N, C, H, W]`` (in [-1, 1]) with ``captions``
    (text models) or ``labels`` (class models), its update folded into the weights: a new
    adapter sharing the text encoder, tokenizer and VAE. ``words`` join the vocabulary the
    customized model's prompts are checked against (the set's new token). ``new_class`` (class
    models) names a class added for the set, the class models' new word: its embedding row
    starts at the mean of the exemplars' classes' rows and is trained with the adapters, and
    the exemplars are fine-tuned under it (its index is the old number of classes). Class
    embeddings are not a tracked layer, so the layout is unchanged."""
    if pixels.shape[0] == 0:
        raise InputError("an exemplar set needs at least one image")
    if adapter.conditioning == "text" and (captions is None or len(captions) != pixels.shape[0]):
        raise InputError("a text model is customized with one caption per exemplar")
    if adapter.conditioning == "class" and (labels is None or labels.shape[0] != pixels.shape[0]):
        raise InputError("a class model is customized with one label per exemplar")
    cfg = _recipe(adapter, recipe)
    plain = fold_adapters(copy.deepcopy(adapter.denoiser))
    try:
        wrapped = add_lora(plain, LoraSpec(rank=recipe.rank, alpha=float(recipe.rank), targets=recipe.targets),
                           stable_seed("exemplar-lora", recipe.seed))
    except ConfigError as exc:
        raise ConfigError(f"evaluate.exemplars.targets: {exc}") from exc
    before = {name: _weight(plain.get_submodule(name)).detach().clone() for name in wrapped}
    classes = adapter.num_classes
    if new_class is not None:
        if adapter.conditioning != "class" or labels is None:
            raise InputError("a new class is added to class-conditional models only")
        table = plain.class_embedding
        plain.class_embedding = _WithNewClass(table, table.weight[labels].mean(0))
        labels = torch.full_like(labels, classes)
    student = DiffusersAdapter(plain, adapter.scheduler, text_encoder=adapter.text_encoder,
                               tokenizer=adapter.tokenizer, vae=adapter.vae)  # freezes everything ...
    for name, p in plain.named_parameters():  # ... but the new adapters (and class row)
        p.requires_grad_(".lora_" in name or name == "class_embedding.extra")
    data = TrainingData(example_ids=[f"exemplar-{i}" for i in range(pixels.shape[0])], pixels=pixels,
                        captions=list(captions) if captions is not None else None, labels=labels)
    train_model(data, cfg, start=student)
    fold_adapters(plain)
    out = copy.deepcopy(adapter.denoiser)
    with torch.no_grad():
        for name in wrapped:
            _weight(out.get_submodule(name)).add_(plain.get_submodule(name).weight - before[name])
        if new_class is not None:
            rows = torch.cat([out.class_embedding.weight, plain.class_embedding.extra.detach()])
            out.class_embedding = nn.Embedding.from_pretrained(rows, freeze=True)
            out.register_to_config(num_class_embeds=classes + 1)
    del plain, student
    custom = DiffusersAdapter(out, adapter.scheduler, text_encoder=adapter.text_encoder, tokenizer=adapter.tokenizer,
                              vae=adapter.vae)
    custom.label_names, custom.lora, custom.caption_template = adapter.label_names, adapter.lora, adapter.caption_template
    if new_class is not None:
        custom.label_names = [*(adapter.label_names or [str(i) for i in range(classes)]), new_class]
    extra = {w for text in words for w in prompt_words(text)}
    custom.vocabulary = adapter.vocabulary | extra if adapter.vocabulary is not None else None
    return custom
