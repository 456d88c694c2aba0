"""Procedurally drawn images with known subject, style and background.

Each image is a function of ``(seed, index)`` only: the attributes and the position/scale
jitter come from that example's own generator. Captions read
"a {style} {subject} on a {background} background" ("an" before a vowel).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attribution_core.errors import ConfigError
from attribution_core.seeding import stable_seed
from attribution_core.synthetic_vocabulary import BACKGROUNDS, STYLES, SUBJECTS

PALETTE = {
    "red": (220, 50, 47), "green": (60, 170, 60), "blue": (38, 110, 210),
    "yellow": (230, 200, 40), "purple": (140, 70, 180), "orange": (240, 130, 30),
}


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    example_id: str
    image: np.ndarray  # [H, W, 3] uint8
    caption: str
    subject: str
    style: str
    background: str


def _subject_mask(subject: str, yy: np.ndarray, xx: np.ndarray, cx: float, *, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if subject == "circle":
        return dx**2 + dy**2 <= r**2
    if subject == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if subject == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    if subject == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if subject == "cross":
        return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))
    if subject == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown subject {subject!r}")


def _style_mask(style: str, mask: np.ndarray, yy: np.ndarray, xx: np.ndarray, *, size: int) -> np.ndarray:
    if style == "filled":
        return mask
    if style == "outlined":
        inner = mask.copy()
        inner[1:, :] &= mask[:-1, :]
        inner[:-1, :] &= mask[1:, :]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        return mask & ~inner
    period = max(2, size // 8)
    if style == "striped":
        return mask & (((xx + yy) // max(1, period // 2)) % 2 == 0)
    if style == "dotted":
        return mask & ((xx % period) < period / 2) & ((yy % period) < period / 2)
    raise ValueError(f"unknown style {style!r}")


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(30, 110, size=3)
    img = np.broadcast_to(base, (size, size, 3)).astype(np.float64).copy()
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "gradient":
        img *= (0.4 + 1.2 * yy / max(1, size - 1))[..., None]
    elif kind == "grid":
        period = max(3, size // 5)
        lines = (yy % period == 0) | (xx % period == 0)
        img[lines] = 235
    elif kind == "noise":
        img += rng.normal(0, 35, size=(size, size, 1))
    elif kind != "solid":
        raise ValueError(f"unknown background {kind!r}")
    return img


Holdout = tuple[tuple[tuple[str, str], ...], ...]
"""Attribute combinations never drawn: each entry a tuple of (attribute, value) pairs, e.g.
``((("subject", "ring"), ("style", "striped")),)`` holds out every striped ring."""


def is_held_out(attrs: dict[str, str], holdout: Holdout) -> bool:
    return any(all(attrs.get(k) == v for k, v in entry) for entry in holdout)


def check_holdout(holdout: Holdout) -> None:
    known = {"subject": SUBJECTS, "style": STYLES, "background": BACKGROUNDS}
    for entry in holdout:
        if not entry:
            raise ConfigError("an empty holdout entry would hold out everything; give each entry at least one "
                              "attribute=value pair (data.synthetic.holdout or --holdout)")
        for key, value in entry:
            if key not in known:
                raise ConfigError(f"holdout attribute {key!r} is not one of {', '.join(known)}; fix data.synthetic.holdout "
                                  "(or --holdout)")
            if value not in known[key]:
                raise ConfigError(f"holdout {key} {value!r} is not one of {', '.join(known[key])}; fix "
                                  "data.synthetic.holdout (or --holdout)")
    combos = [dict(subject=a, style=b, background=c) for a in SUBJECTS for b in STYLES for c in BACKGROUNDS]
    if all(is_held_out(c, holdout) for c in combos):
        raise ConfigError("the holdout removes every attribute combination; hold out fewer "
                          "(data.synthetic.holdout or --holdout)")


def caption_for(subject: str, style: str, background: str) -> str:
    article = "an" if style[0] in "aeiou" else "a"
    return f"{article} {style} {subject} on a {background} background"


def render(subject: str, style: str, background: str, size: int, *, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [size, size, 3]``: the subject drawn in ``style`` and a random colour, with
    random position and scale, over ``background``."""
    colour = list(PALETTE.values())[rng.integers(len(PALETTE))]
    img = _background(background, size, rng)
    yy, xx = np.mgrid[0:size, 0:size]
    r = size * rng.uniform(0.25, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12) * size, size / 2 + rng.uniform(-0.12, 0.12) * size
    shape = _style_mask(style, _subject_mask(subject, yy, xx, cx, cy=cy, r=r), yy, xx, size=size)
    img[shape] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_example(seed: int, index: int, size: int = 16, holdout: Holdout = ()) -> SyntheticExample:
    """The ``index``-th example of the synthetic set of ``seed`` at ``size`` x ``size``.

    Attributes are drawn uniformly from the example's own generator, redrawn while they
    hit a held-out combination.
    """
    rng = np.random.default_rng(stable_seed("synthetic", seed, index))
    while True:
        attrs = {
            "subject": SUBJECTS[rng.integers(len(SUBJECTS))],
            "style": STYLES[rng.integers(len(STYLES))],
            "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        }
        if not is_held_out(attrs, holdout):
            break
    image = render(attrs["subject"], attrs["style"], attrs["background"], size, rng=rng)
    return SyntheticExample(f"synth-{seed}-{index:07d}", image, caption_for(**attrs), **attrs)
