"""Does the model draw what it is asked? Attribute accuracy of generated images.

A small CNN, trained on the real training images only (never on the diffusion model's
output), predicts each attribute (subject, style, background) of an image. Images generated
from prompts that state all three are scored by how often the classifier reads back the
prompted value; the classifier's own accuracy on held-back real images is reported beside
it, as the ceiling of what the measurement can show.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TypedDict

import numpy as np
import torch
from torch import nn

from attribution_core.data.images import decode_image, encode_png
from attribution_core.data.synthetic import caption_for
from attribution_core.models.adapters import DiffusersAdapter
from attribution_core.models.sampling import generate
from attribution_core.seeding import stable_seed

log = logging.getLogger(__name__)

ATTRIBUTES = ("subject", "style", "background")


class AttributeNet(nn.Module):
    """Conv net with one linear head per attribute: ``[B, C, H, W]`` -> ``{attr: [B, n_attr]}``."""

    def __init__(self, channels: int, classes: dict[str, int]) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        # Two poolings and five 3x3 convs: the receptive field covers the whole subject,
        # which shape recognition needs (one pooling level read subjects at chance).
        self.body = nn.Sequential(
            *block(channels, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, n) for name, n in classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {name: head(h) for name, head in self.heads.items()}


@dataclasses.dataclass
class AttributeClassifier:
    net: AttributeNet
    values: dict[str, list[str]]  # attribute -> class names
    real_accuracy: dict[str, float]

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> dict[str, list[str]]:
        self.net.eval()
        logits = self.net(pixels)
        return {a: [self.values[a][i] for i in logits[a].argmax(1).tolist()] for a in self.values}


def train_classifier(pixels: torch.Tensor, attributes: dict[str, list[str]], epochs: int = 15,
                     seed: int = 0) -> AttributeClassifier:
    """Fit on 90 % of the real images; report accuracy on the other 10 %."""
    torch.manual_seed(seed)
    values = {a: sorted(set(v)) for a, v in attributes.items()}
    targets = {a: torch.tensor([values[a].index(x) for x in v]) for a, v in attributes.items()}
    n = pixels.shape[0]
    g = torch.Generator().manual_seed(stable_seed("classifier", seed))
    perm = torch.randperm(n, generator=g)
    held = perm[: max(1, n // 10)]
    train = perm[max(1, n // 10):]
    net = AttributeNet(pixels.shape[1], {a: len(v) for a, v in values.items()})
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = epochs * math.ceil(len(train) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=batches)
    for _ in range(epochs):
        net.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            x = pixels[idx]
            x = x + 0.05 * torch.randn(x.shape, generator=g)  # generated images are a little noisy
            out = net(x)
            loss = sum(nn.functional.cross_entropy(out[a], targets[a][idx]) for a in values)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    clf = AttributeClassifier(net, values, {})
    pred = clf.predict(pixels[held])
    clf.real_accuracy = {a: sum(p == attributes[a][i] for p, i in zip(pred[a], held.tolist())) / len(held)
                         for a in values}
    return clf


class ModelQuality(TypedDict, total=False):
    """Attribute accuracy of generated images, per attribute (``ATTRIBUTES``), over prompts
    the training set had (``held_in``) and held-out combinations (``held_out``); and what
    ``bench model-quality`` adds (``seconds``, ``model``)."""

    subject: float
    style: float
    background: float
    n: int
    held_in: dict[str, float]
    held_out: dict[str, float]
    classifier_real_accuracy: dict[str, float]
    guidance: float
    steps: int
    seconds: float
    model: str


def model_quality(
    adapter: DiffusersAdapter,
    classifier: AttributeClassifier,
    held_in: list[dict[str, str]],
    held_out: list[dict[str, str]],
    *, per_combo: int,
    guidance: float,
    steps: int,
    seed: int,
) -> ModelQuality:
    """Generate ``per_combo`` images per attribute combination and score them."""

    def score(combos: list[dict[str, str]], first: int) -> dict[str, float]:
        if not combos:
            return {"n": 0}
        prompts = [caption_for(c["subject"], c["style"], c["background"]) for c in combos]
        wanted = [c for c in combos for _ in range(per_combo)]
        images = generate(adapter, prompts=[p for p in prompts for _ in range(per_combo)], n=len(wanted),
                          seed=seed, guidance=guidance, steps=steps, first_index=first)
        size, channels = images[0].image.shape[0], images[0].image.shape[2]
        pixels = torch.from_numpy(np.stack([  # generated images enter like any image: PNG bytes, decoded
            decode_image(encode_png(im.image), f"generated-{im.index}", size, channels) for im in images]))
        pred = classifier.predict(pixels)
        out: dict[str, float] = {"n": len(wanted)}
        for a in classifier.values:
            out[a] = sum(p == w[a] for p, w in zip(pred[a], wanted)) / len(wanted)
        return out

    inside = score(held_in, 0)
    outside = score(held_out, 10**6)
    total = inside["n"] + outside["n"]
    result: ModelQuality = {}
    for a in classifier.values:
        result[a] = (inside.get(a, 0) * inside["n"] + outside.get(a, 0) * outside["n"]) / total
    result.update(n=total, held_in=inside, held_out=outside, classifier_real_accuracy=classifier.real_accuracy,
                  guidance=guidance, steps=steps)
    return result
