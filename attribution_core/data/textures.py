"""Procedural texture photographs in classes: a second, unlike dataset for benchmarks.

The shapes set (``synthetic.py``) has flat colours, one object and a caption naming three
attributes. These images have none of that: each is a class of texture (stripes, checks,
dots, rings, waves, marble) at a random orientation, frequency and phase, in two colours
drawn from a continuous range, under uneven lighting, blur and sensor noise, with only a class
label (no caption). A model of them is class-conditional. Each image is a function of
``(seed, index)`` only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attribution_core.seeding import stable_seed

TEXTURES = ("stripes", "checks", "dots", "rings", "waves", "marble")


@dataclasses.dataclass(frozen=True)
class TextureExample:
    example_id: str
    image: np.ndarray  # [H, W, 3] uint8
    label: str


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, freq: float, *, phase: float,
             rng: np.random.Generator) -> np.ndarray:
    """``[H, W]`` in [0, 1]: the texture's mixing field over rotated coordinates (u, v)."""
    if kind == "stripes":
        return (np.sin(2 * np.pi * freq * u + phase) > 0).astype(float)
    if kind == "checks":
        return ((np.floor(freq * u + phase) + np.floor(freq * v)) % 2).astype(float)
    if kind == "dots":
        cu, cv = (freq * u + phase) % 1 - 0.5, (freq * v) % 1 - 0.5
        return (cu**2 + cv**2 < 0.09).astype(float)
    if kind == "rings":
        return (np.sin(2 * np.pi * freq * np.sqrt(u**2 + v**2) + phase) > 0).astype(float)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + 1.5 * np.sin(2 * np.pi * 0.5 * freq * v) + phase)
    if kind == "marble":
        field = sum(rng.normal() * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * u + rng.uniform(0.5, 2) * v)
                                         + rng.uniform(0, 2 * np.pi)) for _ in range(4))
        return 0.5 + 0.5 * np.sin(2 * np.pi * 0.6 * freq * u + 2.0 * field + phase)
    raise ValueError(f"unknown texture {kind!r}")


def _blur(image: np.ndarray) -> np.ndarray:
    """A 3x3 binomial blur (edge-padded) of ``[H, W, C]``."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    kernel = np.array([1.0, 2.0, 1.0]) / 4
    rows = sum(kernel[i] * padded[i : i + image.shape[0], :, :] for i in range(3))
    return sum(kernel[j] * rows[:, j : j + image.shape[1], :] for j in range(3))


def draw_texture(seed: int, index: int, size: int = 16) -> TextureExample:
    """The ``index``-th image of the texture set of ``seed`` at ``size`` x ``size``."""
    rng = np.random.default_rng(stable_seed("textures", seed, index))
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    mix = _pattern(kind, u, v, rng.uniform(2.0, 4.5), phase=rng.uniform(0, 2 * np.pi), rng=rng)[..., None]  # [H, W, 1]
    hue = rng.uniform()
    light = _hsv_to_rgb(hue, rng.uniform(0.2, 0.8), rng.uniform(0.7, 1.0))
    dark = _hsv_to_rgb((hue + rng.uniform(0.25, 0.75)) % 1, rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.5))
    image = mix * light + (1 - mix) * dark  # [H, W, 3] in [0, 1]
    lighting = 1 + rng.uniform(-0.35, 0.35) * (np.cos(rng.uniform(0, 2 * np.pi)) * xx + np.sin(rng.uniform(0, 2 * np.pi)) * yy)
    image = _blur(image * lighting[..., None]) + rng.normal(0, 0.04, image.shape)
    pixels = np.clip(image * 255, 0, 255).astype(np.uint8)
    return TextureExample(example_id=f"tex-{seed}-{index:06d}", image=pixels, label=kind)
